"""Console progress and ``metrics.jsonl``: what a person watching the run and a script reading it later see."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import weakref
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from kdforge.errors import ConfigError


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed each time, so a crash loses nothing).

    With ``tensorboard_dir`` the same records also go to TensorBoard (see :class:`TensorBoardWriter`); ``close``
    ends that event file (``fit`` closes it on success and on error).
    """

    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.tensorboard = TensorBoardWriter(tensorboard_dir) if tensorboard_dir is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record, default=float) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


TENSORBOARD_HINT = "install kdforge[tensorboard] (pip install 'kdforge[tensorboard]') or set train.tensorboard=false"


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can work: it needs the ``tensorboard`` package (the extra)."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a ``metrics.jsonl`` key, or None for keys that are not plotted (epoch, step).

    Train loss parts go under ``train/``, test metrics under ``test/``, evaluator accuracies (EMA, peers, a
    fine-tuned teacher) under ``eval/``, throughput under ``speed/``.
    """
    if key in ("epoch", "step"):
        return None
    if key == "lr":
        return "lr"
    if key in ("epoch_time_s", "img_per_s"):
        return f"speed/{key}"
    for prefix in ("train_", "test_"):
        if key.startswith(prefix):
            return f"{prefix.rstrip('_')}/{key.removeprefix(prefix)}"
    if key.startswith("loss_"):
        return f"train/{key}"
    if key == "best_top1":
        return "test/best_top1"
    if key.endswith("_top1"):
        return f"eval/{key}"
    return key


class TensorBoardWriter:
    """Per-epoch scalars of the ``metrics.jsonl`` records in a TensorBoard event file (``train.tensorboard``).

    Flushed after every record, like ``metrics.jsonl``, so a crashed run still shows every finished epoch.
    """

    def __init__(self, log_dir: str | Path) -> None:
        if not tensorboard_available():
            raise ConfigError(f"train.tensorboard=true needs the tensorboard package: {TENSORBOARD_HINT}")
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Any = SummaryWriter(log_dir=str(log_dir))
        # A run that stops on an error drops its writer with the loop's frame: close the event file then too.
        self._finalizer = weakref.finalize(self, self.writer.close)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record.get("epoch", 0))
        for key, value in record.items():
            tag = tensorboard_tag(key)
            if tag is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self._finalizer()
            self.writer = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def format_parts(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in parts.items())


class Console:
    """Rank-0 output: a per-epoch progress bar (ETA, img/s, loss parts) and one summary line per epoch.

    The bar draws only on an interactive terminal; logs (CI, ``nohup``) get the summary lines alone.
    """

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self._t0 = time.perf_counter()

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.enabled:
            return
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            leave=False,
            file=self.stream,
            disable=not interactive,
            dynamic_ncols=True,
        )

    def update(self, steps: int, parts: dict[str, float], img_per_s: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"{format_parts(parts)} | {img_per_s:,.0f} img/s", refresh=False)
        self.bar.update(steps)

    def end_epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.print(line)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)
