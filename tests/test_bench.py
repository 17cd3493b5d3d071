"""``kdforge bench``: the reference loop augments like RepDistiller, both paths train, the report is well formed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.bench import PILCifarDataset, format_bench, run_bench, write_bench
from kdforge.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(n: int = 4, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


@pytest.mark.parametrize(("top", "left", "flip"), [(0, 0, False), (4, 4, False), (8, 3, True), (2, 7, True)])
def test_reference_transform_is_pad_crop_flip_normalize(top, left, flip):
    images = _images()
    ds = PILCifarDataset(images, np.zeros(4, dtype=np.int64), MEAN, STD)
    got = ds.transform(Image.fromarray(images[1].transpose(1, 2, 0)), top, left, flip).numpy()
    # Independent numpy version of RandomCrop(8, padding=4) + flip + ToTensor + Normalize.
    padded = np.pad(images[1].astype(np.float32) / 255.0, ((0, 0), (4, 4), (4, 4)))
    want = padded[:, top : top + 8, left : left + 8]
    if flip:
        want = want[:, :, ::-1]
    want = (want - np.array(MEAN, dtype=np.float32)[:, None, None]) / np.array(STD, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_reference_dataset_items_carry_label_and_index():
    images = _images()
    labels = np.array([3, 1, 4, 1])
    x, y, i = PILCifarDataset(images, labels, MEAN, STD)[2]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert (y, i) == (4, 2)


def test_bench_times_both_paths_and_writes_json(tmp_path):
    report = run_bench("kd", "resnet8", "resnet8", batch_size=16, steps=2, warmup=1, rounds=2, workers=0, device="cpu")
    paths = [r["path"] for r in report["results"]]
    assert paths == ["kdforge", "reference"]
    for r in report["results"]:
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_mem_mb"] is None
        assert r["img_per_s"] == pytest.approx(16 * 1000.0 / r["ms_per_step"])
    kd, ref = report["results"]
    assert report["speedup"] == pytest.approx(kd["img_per_s"] / ref["img_per_s"])
    table = format_bench(report)
    assert "| kdforge |" in table and "| reference |" in table and "kdforge / reference" in table
    write_bench(report, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["settings"]["method"] == "kd"


def test_bench_without_reference_and_for_a_teacherless_method():
    report = run_bench("vanilla", "resnet8", "resnet8", batch_size=8, steps=1, warmup=0, rounds=1, reference=False)
    assert [r["path"] for r in report["results"]] == ["kdforge"] and "speedup" not in report
    assert report["settings"]["teacher"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "ccd"}, "dual-view"), ({"steps": 0}, "--steps"), ({"rounds": 0}, "--rounds")],
)
def test_bench_rejects_what_it_cannot_time(kwargs, message):
    args = {"method": "kd", "teacher": "resnet8", "student": "resnet8", "batch_size": 8, **kwargs}
    with pytest.raises(ConfigError, match=message):
        run_bench(**args)


def test_bench_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    from kdforge.cli import main

    out = tmp_path / "b.json"
    args = ["bench", "--teacher", "resnet8", "--batch-size", "8", "--steps", "1", "--rounds", "1", "--warmup", "0"]
    assert main([*args, "--workers", "0", "--json", str(out), "temperature=2"]) == 0
    assert "kdforge / reference" in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["params"] == {"temperature": 2}
    assert main([*args, "tempreature=2"]) == 2
    assert "method.temperature" in capsys.readouterr().err
