"""Tasks: what a network is trained to do (its targets, its own loss, its post-processing and its metric).

A task lives outside the distillation methods and outside the training loop, so that a method distils whatever task
it declares and the loop evaluates whatever metric the task names (DESIGN.md §2b). Importing this package registers
every task in ``kdforge.registry.TASKS``.
"""

from kdforge.tasks import classification, detection, enhancement, hashing, oriented, segmentation
from kdforge.tasks.base import Evaluator, LocalReducer, Reducer, Task

__all__ = [
    "Evaluator",
    "LocalReducer",
    "Reducer",
    "Task",
    "classification",
    "detection",
    "enhancement",
    "hashing",
    "oriented",
    "segmentation",
]
