"""The run directory: created once by rank 0, refused when it already holds a run (unless resuming or forced)."""

from __future__ import annotations

import shutil
from pathlib import Path

from kdforge.errors import ConfigError

RUN_MARKERS = ("metrics.jsonl", "last.pt")


def prepare_run_dir(out_dir: str | Path, *, resume: bool, force: bool) -> Path:
    """Create ``out_dir``; refuse one that already holds a run unless resuming or forced (then it is cleared).

    Raises:
        ConfigError: ``out_dir`` is an existing file (or lies below one), cannot be created, holds a run that is
            neither resumed nor forced, or holds no ``last.pt`` to resume.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a directory; choose another --out")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if resume:
        if not (out / "last.pt").is_file():
            raise ConfigError(f"--resume: {out} holds no last.pt to resume from; start the run without --resume")
    elif holds_run:
        if not force:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, --force to overwrite it, "
                "or choose another --out"
            )
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, no permission, a read-only file system
        why = err.strerror or err
        raise ConfigError(f"cannot create the run directory {out}: {why}; choose another --out") from None
    return out


__all__ = ["RUN_MARKERS", "prepare_run_dir"]
