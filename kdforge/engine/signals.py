"""Stopping on SIGTERM/SIGINT: the running step finishes, ``last.pt`` is written, then training stops."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from kdforge.errors import KDForgeError


class TrainingInterrupted(KDForgeError):
    """Training stopped on SIGTERM/SIGINT after writing ``last.pt``; ``--resume`` continues exactly."""


class StopRequest:
    """SIGTERM/SIGINT during ``fit``: remembered, the running step finishes, ``last.pt`` is written, then it stops.

    A second signal stops at once (``KeyboardInterrupt``). Handlers are only installed from the main thread (Python
    allows no other) and are restored when ``fit`` returns or raises.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def interrupted(stop: StopRequest, epoch: int, step: int, out: Path | None) -> TrainingInterrupted:
    """The error a stopped run ends with: who stopped it, where, and how to continue."""
    where = f"; {out / 'last.pt'} holds it: continue with --resume" if out is not None else ""
    if stop.signal_name is None:  # under DDP another rank received the signal
        return TrainingInterrupted(f"stopped with the other ranks in epoch {epoch + 1} after step {step}{where}")
    return TrainingInterrupted(f"stopped by {stop.signal_name} in epoch {epoch + 1} after step {step}{where}")


__all__ = ["StopRequest", "TrainingInterrupted", "interrupted"]
