"""Method parameters: a method's typed constructor keyword arguments are its config schema.

Read through ``inspect``, so adding a method never touches :mod:`kdforge.config`; values are type-checked with the
config's own coercion, so a method parameter fails with the same one-line messages as any other key.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from typing import Any

from kdforge.config import _unknown_key, coerce
from kdforge.errors import ConfigError

# Arguments the engine supplies from the run itself; a config may not set them.
CONTEXT_ARGS = ("student", "teacher", "num_classes", "num_train", "train_targets", "epochs", "steps_per_epoch", "task")


def method_signature(cls: type) -> dict[str, inspect.Parameter]:
    """The user-settable constructor parameters of a method class (context arguments excluded)."""
    params = inspect.signature(cls.__init__).parameters
    return {
        n: p
        for n, p in params.items()
        if n != "self" and n not in CONTEXT_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_method_params(cls: type, params: Mapping[str, Any], prefix: str = "method.") -> dict[str, Any]:
    """Type-check ``params`` against the constructor of ``cls``; returns the coerced values."""
    sig = method_signature(cls)
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for key, value in params.items():
        if key not in sig:
            if key in CONTEXT_ARGS:
                raise ConfigError(f"{prefix}{key} is set by kdforge from the run itself; remove it from the config")
            raise _unknown_key(str(key), sorted(sig), prefix)  # YAML keys can be ints or bools (`yes:`)
        out[key] = coerce(value, hints.get(key, Any), f"{prefix}{key}")
    return out


def method_defaults(cls: type) -> dict[str, Any]:
    """Default values of the settable constructor parameters of a method class."""
    return {n: p.default for n, p in method_signature(cls).items() if p.default is not inspect.Parameter.empty}


__all__ = ["CONTEXT_ARGS", "check_method_params", "method_defaults", "method_signature"]
