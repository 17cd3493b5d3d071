"""kdforge: knowledge distillation with Adaptive Teacher Finetune and the methods of the KD literature."""

from kdforge.api import build_data, build_run, evaluate, evaluate_checkpoint, fit, run
from kdforge.engine.env import package_version
from kdforge.methods import create_method, list_methods
from kdforge.models import count_parameters, create_model, list_models

__version__ = package_version()

__all__ = [
    "__version__",
    "build_data",
    "build_run",
    "count_parameters",
    "create_method",
    "create_model",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "list_methods",
    "list_models",
    "run",
]
