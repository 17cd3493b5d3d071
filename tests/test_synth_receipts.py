"""The rendered receipt dataset: deterministic, balanced, in the image-folder layout, and not trivially separable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdforge.data import _embedded_arrays
from kdforge.data.folder import scan_folder
from kdforge.data.synth.receipts import render_receipt_image, write_receipt_folder
from kdforge.errors import DataError


@pytest.fixture(scope="module")
def backgrounds() -> dict[str, np.ndarray]:
    data = _embedded_arrays()
    return {"train": data.train_images[:300], "val": data.test_images[:100]}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_writes_a_balanced_folder_dataset_deterministically(tmp_path: Path, backgrounds) -> None:
    a = write_receipt_folder(tmp_path / "a", backgrounds, {"train": 6, "val": 3}, seed=1, size=64)
    b = write_receipt_folder(tmp_path / "b", backgrounds, {"train": 6, "val": 3}, seed=1, size=64)
    c = write_receipt_folder(tmp_path / "c", backgrounds, {"train": 6, "val": 3}, seed=2, size=64)
    assert _digest(a) == _digest(b) != _digest(c)
    samples, classes = scan_folder(a / "train")
    assert classes == ["other", "receipt"]
    assert [lab for _, lab in samples].count(0) == 6 and [lab for _, lab in samples].count(1) == 6
    img = Image.open(samples[0][0])
    assert img.size == (64, 64) and img.mode == "RGB"


def test_receipts_carry_paper_and_text(backgrounds) -> None:
    rng = np.random.default_rng(0)
    bright_receipt, bright_other = [], []
    for _ in range(20):
        r = render_receipt_image(backgrounds["train"], True, rng, 96).astype(float)
        o = render_receipt_image(backgrounds["train"], False, rng, 96).astype(float)
        bright_receipt.append((r.mean(axis=2) > 180).mean())
        bright_other.append((o.mean(axis=2) > 180).mean())
    # Receipts always hold a large bright strip; "other" images hold one only half the time (blank cards, prints),
    # so the classes overlap in brightness and a classifier must look at the text.
    assert np.mean(bright_receipt) > np.mean(bright_other)
    assert max(bright_other) > min(bright_receipt)


def test_refuses_to_overwrite_and_bad_backgrounds(tmp_path: Path, backgrounds) -> None:
    write_receipt_folder(tmp_path, backgrounds, {"val": 1}, size=32)
    with pytest.raises(DataError, match="already exists"):
        write_receipt_folder(tmp_path, backgrounds, {"val": 1}, size=32)
    with pytest.raises(DataError, match="no background images"):
        write_receipt_folder(tmp_path / "x", backgrounds, {"test": 1}, size=32)
