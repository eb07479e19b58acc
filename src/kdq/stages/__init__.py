"""Stages: one file = one YAML `kind` = one Python entry point = one CLI verb.

A stage module defines its entry point (a plain function, e.g. `quantize(run, out, *, method=...)`)
and registers it once with `STAGES.register(StageKind(...))`. From that one registration:

- the YAML schema of `kind: <name>` follows the entry point's signature (`kdq.config`): its
  keyword parameters are the stage's keys, `**options` adds the training options, and a
  first parameter `run` is the YAML key `source` (an earlier float stage), `model`/`student`
  the key `model`;
- `kdq <name>` is the CLI verb, with the stage's own arguments (or ones derived from the
  signature when it gives none);
- the experiment (`kdq.experiment`) calls the entry point with the stage's options, its
  folder as `out`, the experiment's data, and `resume` when its configuration is unchanged.
"""

from kdq.stages.registry import INJECTED, STAGES, YAML_NAMES, StageKind, StageRegistry, signature_arguments, signature_cli

# The built-in stages register themselves on import, in the order `kdq --help` lists them (the
# recipe stage: kdq.recipes, a layer above).
from kdq.stages import train, distill, evaluate, quantize, qat, prune, export, deploy  # noqa: E402, F401, I001
from kdq.stages import self_distill, born_again, takd_size  # noqa: E402, F401, I001
from kdq.stages import mutual  # noqa: E402, F401, I001

__all__ = ["INJECTED", "STAGES", "YAML_NAMES", "StageKind", "StageRegistry", "signature_arguments", "signature_cli"]
