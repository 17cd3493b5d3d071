"""``kdforge.enhance.enhance_folder``: a trained enhancer on a user's folder, written as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kdforge.enhance import enhance_folder
from kdforge.errors import ConfigError, DataError
from kdforge.models.dense.enhancer import unet_enhancer_w8


def _run_dir(root: Path, task: str = "enhancement") -> tuple[Path, torch.nn.Module]:
    """A run directory as ``kdforge train`` leaves it: ``model.pt`` and ``config.yaml``."""
    torch.manual_seed(0)
    model = unet_enhancer_w8()
    with torch.no_grad():  # a visible, non-identity enhancement: brighten by the head's bias
        model.head.bias.fill_(0.2)
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / "model.pt")
    cfg = {
        "task": {"name": task},
        "model": {"name": "unet_enhancer_w8"},
        "method": {"name": "vanilla"},
        "data": {"name": "cifar10_lowlight"},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root, model.eval()


def test_enhanced_files_equal_the_network_on_raw_inputs(tmp_path: Path) -> None:
    run, model = _run_dir(tmp_path / "run")
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    images = {"b.png": rng.integers(0, 80, (13, 21, 3), dtype=np.uint8), "a.jpg": None}
    Image.fromarray(images["b.png"]).save(src / "b.png")
    Image.fromarray(rng.integers(0, 80, (8, 8), dtype=np.uint8), mode="L").save(src / "a.jpg")  # grey → RGB
    (src / "c.png").write_bytes(b"not an image")
    (src / "notes.txt").write_text("ignored")
    result = enhance_folder(run, src, tmp_path / "out")
    assert [p.name for p in result.written] == ["a.png", "b.png"] and result.model == "unet_enhancer_w8"
    assert [p.name for p, _ in result.skipped] == ["c.png"] and "cannot read image" in result.skipped[0][1]
    x = torch.from_numpy(images["b.png"]).permute(2, 0, 1).float().div(255.0)[None]  # raw [0, 1], no mean/std
    with torch.no_grad():
        want = model(x)[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(tmp_path / "out" / "b.png"))
    assert got.shape == (13, 21, 3) and np.array_equal(got, want)
    assert got.mean() > images["b.png"].mean() + 30  # brighter
    assert not list((tmp_path / "out").glob(".*.tmp"))
    with pytest.raises(DataError, match="exists"):
        enhance_folder(run, src, tmp_path / "out")
    assert len(enhance_folder(run, src, tmp_path / "out", overwrite=True).written) == 2
    with pytest.raises(DataError, match="cannot read image"):
        enhance_folder(run, src, tmp_path / "out2", on_error="stop")


def test_clear_errors(tmp_path: Path) -> None:
    run, _ = _run_dir(tmp_path / "run")
    seg, _ = _run_dir(tmp_path / "seg", task="segmentation")
    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        enhance_folder(run, src, tmp_path / "out")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "x.png")
    with pytest.raises(ConfigError, match="holds a segmentation network"):
        enhance_folder(seg, src, tmp_path / "out")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "x.jpg")
    with pytest.raises(DataError, match="would both be written as x.png"):
        enhance_folder(run, src, tmp_path / "out")
    with pytest.raises(DataError, match="is not a folder"):
        enhance_folder(run, tmp_path / "missing", tmp_path / "out")


def test_cli_enhance_writes_the_folder(tmp_path: Path, capsys) -> None:
    from kdforge.cli import main

    run, _ = _run_dir(tmp_path / "run")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((9, 9, 3), 20, dtype=np.uint8)).save(src / "dark.png")
    argv = ["enhance", "--checkpoint", str(run), "--input", str(src), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "1 enhanced images" in capsys.readouterr().out
    assert (tmp_path / "out" / "dark.png").is_file()
    assert main(argv) != 0  # the output exists: one line, non-zero, nothing overwritten
    assert "exists" in capsys.readouterr().err
