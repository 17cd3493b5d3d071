"""A scoped forward-hook tap: stage features from models that have no ``forward_features``.

kdforge's own models return their features from ``forward_features``; third-party networks (a timm or
torchvision model, a user's module) can still feed feature-based methods through :class:`FeatureTap`, which
records the outputs of named submodules during a forward pass and removes its hooks when the scope ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from kdforge.registry import UnknownNameError, close_matches


class FeatureTap:
    """Records the outputs of submodules while the ``with`` block runs.

    Example::

        with FeatureTap(model, ["layer2", "layer3.1.conv2"]) as tap:
            logits = model(x)
        f2, f3 = tap.outputs  # [B, C, H, W] each

    ``outputs[i]`` holds the latest output of ``module_paths[i]`` (``None`` until that module runs) and survives
    the ``with`` block. Hooks are removed on exit, also when the block raises.

    Note:
        ``forward`` of a kdforge model calls every submodule, so hooks on any of them fire there. Its
        ``forward_features`` runs residual stages block by block to expose the last block's pre-activation, so a
        hook on such a stage (``layer1``) or on its last block does not fire inside ``forward_features``.

    Args:
        model: the network.
        module_paths: dotted submodule names as in ``model.named_modules()`` (``"layer3.1.conv2"``).

    Raises:
        UnknownNameError: (a ``KeyError``) a path names no submodule; the message lists close names.
    """

    def __init__(self, model: nn.Module, module_paths: Sequence[str]) -> None:
        self.model = model
        self.module_paths = list(module_paths)
        self.modules = [self._resolve(model, path) for path in self.module_paths]
        self.outputs: list[Any] = [None] * len(self.modules)
        self._handles: list[RemovableHandle] = []

    @staticmethod
    def _resolve(model: nn.Module, path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            hints = close_matches(path, names)
            hint = f"did you mean {', '.join(repr(h) for h in hints)}? " if hints else ""
            top = ", ".join(n for n, _ in model.named_children())
            raise UnknownNameError(
                f"{type(model).__name__} has no submodule '{path}': {hint}top-level modules: {top}"
            ) from None

    def _store(self, index: int, module: nn.Module, inputs: Any, output: Any) -> None:
        self.outputs[index] = output

    def __enter__(self) -> FeatureTap:
        self.remove()
        self.outputs = [None] * len(self.modules)
        self._handles = [m.register_forward_hook(partial(self._store, i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Removes every hook this tap registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = ["FeatureTap"]
