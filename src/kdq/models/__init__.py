"""The model zoo: `create_model(name)` builds any registered network; `list_models()` names them.

Every model has a final `nn.Linear` named `fc`, a `feature_layers()` method naming its stage
outputs for feature distillation, and a `kdq_spec` (set by `create_model`) to rebuild it.
"""

from kdq.models.registry import MODELS, ModelEntry, create_model, list_models, model_info, register_model

# Each family registers its variants on import; importing them here means
# `import kdq.models` is all a caller (or a test) needs to see the whole zoo.
from kdq.models import cnn, mlp, mobilenetv2, resnet, wide_resnet  # noqa: E402, F401  isort: skip

__all__ = ["MODELS", "ModelEntry", "create_model", "list_models", "model_info", "register_model"]
