"""Console progress and ``metrics.jsonl``: what a person watching the run and a script reading it later see."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed each time, so a crash loses nothing)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")


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
