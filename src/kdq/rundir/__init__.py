"""The run directory, the unit of output: the only place that names its files.

- `layout`: every file name, and the read/write of config.yaml and results.json;
- `claim`: who is writing a directory and what kind of run it holds (locks, no silent overwrite);
- `load`: any run (float, int8, low-bit) loaded through one table of formats, with its data.

`kdq.rundir` itself offers layout and claim, which lower layers may use; import loading from
`kdq.rundir.load` (or `kdq.load_run`, `kdq.load_model`).
"""

from kdq.rundir.claim import RESUME_MAY_CHANGE, RunState, check_claim, check_resume, claim, clear_run, run_state
from kdq.rundir.layout import (
    CONFIG,
    KINDS,
    RESULTS,
    RUN_FILES,
    WEIGHTS,
    check_name,
    eval_file,
    read_config,
    read_results,
    write_config,
    write_results,
)

__all__ = [
    "RESUME_MAY_CHANGE", "RunState", "check_claim", "check_resume", "claim", "clear_run", "run_state",
    "CONFIG", "KINDS", "RESULTS", "RUN_FILES", "WEIGHTS", "check_name", "eval_file", "read_config",
    "read_results", "write_config", "write_results",
]
