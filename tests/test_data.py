"""Data: CIFAR archives (read, download from a local server, checksum), JPEG .npz, embedded subset, loaders,
batched augmentation and image folders."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import balanced_subset, build_data, list_datasets
from kdforge.data.augment import normalize, random_crop, random_hflip
from kdforge.data.cifar import CIFAR10, CIFAR100, _decode_jpegs, load_cifar, load_jpeg_npz
from kdforge.data.folder import ImageFolderDataset
from kdforge.data.loader import TensorLoader
from kdforge.errors import DataError
from tests.conftest import SHARED_CIFAR10

# ---------------------------------------------------------------- fake official archives


def _cifar_rows(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def _add(tar: tarfile.TarFile, name: str, obj: object) -> None:
    data = pickle.dumps(obj)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar10_archive(path: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """A small archive in the official layout (keys are bytes, as the official pickles were written in Python 2)."""
    rows, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            data, lab = _cifar_rows(per_batch, i)
            rows.append(data)
            labels += lab
            _add(tar, f"cifar-10-batches-py/data_batch_{i}", {b"data": data, b"labels": lab})
        test, test_labels = _cifar_rows(3, 9)
        _add(tar, "cifar-10-batches-py/test_batch", {b"data": test, b"labels": test_labels})
        _add(tar, "cifar-10-batches-py/batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return {"train": np.concatenate(rows), "labels": np.array(labels), "test": test}


def make_cifar100_archive(path: Path) -> dict[str, np.ndarray]:
    data, _ = _cifar_rows(6, 1)
    fine = [3, 99, 0, 50, 7, 7]
    test, _ = _cifar_rows(2, 2)
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-100-python/train", {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * 6})
        _add(tar, "cifar-100-python/test", {b"data": test, b"fine_labels": [1, 2], b"coarse_labels": [0, 0]})
        _add(tar, "cifar-100-python/meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return {"train": data, "labels": np.array(fine)}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_cifar10_from_local_server(server, tmp_path, monkeypatch):
    served, base = server
    expected = make_cifar10_archive(served / "cifar-10-python.tar.gz")
    monkeypatch.setenv("KDFORGE_CIFAR10_URL", f"{base}/cifar-10-python.tar.gz")
    monkeypatch.setenv("KDFORGE_CIFAR10_MD5", _md5(served / "cifar-10-python.tar.gz"))
    root = tmp_path / "data"
    bundle = build_data("cifar10", root=str(root), download=True, batch_size=4, augment=False)
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert bundle.num_train == 20 and bundle.num_classes == 10 and bundle.classes[3] == "c3"
    data = load_cifar(CIFAR10, root)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32×32 plane.
    row = expected["train"][7]
    assert np.array_equal(data.train_images[7, 0], row[:1024].reshape(32, 32))
    assert np.array_equal(data.train_images[7, 2, 5, 6], row[2048 + 5 * 32 + 6])
    assert np.array_equal(data.train_labels, expected["labels"])
    assert np.array_equal(data.test_images.reshape(3, -1), expected["test"])
    # The test loader yields exactly the test images, normalized.
    batch = next(iter(bundle.test))
    x = torch.from_numpy(expected["test"].reshape(3, 3, 32, 32))
    torch.testing.assert_close(batch.input, normalize(x, bundle.mean, bundle.std))


def test_download_cifar100_fine_labels(server, tmp_path, monkeypatch):
    served, base = server
    expected = make_cifar100_archive(served / "c100.tgz")
    monkeypatch.setenv("KDFORGE_CIFAR100_URL", f"{base}/c100.tgz")
    monkeypatch.setenv("KDFORGE_CIFAR100_MD5", _md5(served / "c100.tgz"))
    data = load_cifar(CIFAR100, tmp_path / "d", download_missing=True, progress=False)
    assert np.array_equal(data.train_labels, expected["labels"]) and len(data.classes) == 100
    assert data.classes[99] == "f99"


def test_download_failures_leave_nothing(server, tmp_path):
    served, base = server
    make_cifar10_archive(served / "cifar-10-python.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(DataError, match="expected 0123.*nothing was kept"):
        load_cifar(CIFAR10, root, download_missing=True, url=f"{base}/cifar-10-python.tar.gz", md5="0123")
    assert not root.exists() or not list(root.iterdir())
    with pytest.raises(DataError, match="could not download .*404"):
        load_cifar(CIFAR10, root, download_missing=True, url=f"{base}/missing.tar.gz", md5="0")
    assert not list(root.iterdir())


def test_cifar100_download_failures(server, tmp_path):
    served, base = server
    make_cifar100_archive(served / "cifar-100-python.tar.gz")
    root = tmp_path / "c100"
    with pytest.raises(DataError, match="expected ffff.*nothing was kept"):
        load_cifar(CIFAR100, root, download_missing=True, url=f"{base}/cifar-100-python.tar.gz", md5="ffff")
    assert not list(root.iterdir())
    with pytest.raises(DataError, match="could not download .*404"):
        load_cifar(CIFAR100, root, download_missing=True, url=f"{base}/nope.tar.gz", md5="0", progress=False)
    assert not list(root.iterdir())
    with pytest.raises(DataError, match="set data.download=true") as err:
        build_data("cifar100", root=str(root))
    assert str(root) in str(err.value) and "cifar-100-python.tar.gz" in str(err.value)


def test_missing_and_corrupt_archives(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"put cifar-10-python.tar.gz .* into .*, or set data.download=true") as err:
        load_cifar(CIFAR10, tmp_path)
    assert str(tmp_path) in str(err.value) and "https://www.cs.toronto.edu/~kriz/" in str(err.value)
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10_archive(archive)
    with pytest.raises(DataError, match="wrong MD5 checksum"):
        load_cifar(CIFAR10, tmp_path)  # the official checksum does not match the small archive
    archive.write_bytes(archive.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match="not a readable .tar.gz"):
        load_cifar(CIFAR10, tmp_path, md5=_md5(archive))
    other = tmp_path / "other"
    other.mkdir()
    with tarfile.open(other / "cifar-10-python.tar.gz", "w:gz") as tar:
        _add(tar, "something/else", {b"x": 1})
    with pytest.raises(DataError, match="is not the cifar10 python archive"):
        load_cifar(CIFAR10, other, md5=_md5(other / "cifar-10-python.tar.gz"))


def test_extracted_folder_is_read(tmp_path):
    archive = tmp_path / "a.tar.gz"
    expected = make_cifar10_archive(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    data = load_cifar(CIFAR10, tmp_path)
    assert np.array_equal(data.train_labels, expected["labels"])


# ---------------------------------------------------------------- augmentation


def test_random_crop_matches_a_per_sample_reference():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop(x, 0), x)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])


def test_hflip_flips_exactly_the_chosen_samples():
    x = torch.arange(4 * 1 * 2 * 3, dtype=torch.float32).reshape(4, 1, 2, 3)
    out = random_hflip(x, torch.Generator().manual_seed(1))
    chosen = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    for i in range(4):
        assert torch.equal(out[i], x[i].flip(2) if chosen[i] else x[i])


def test_augmentation_is_deterministic_per_generator():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return random_hflip(random_crop(x, 4, g), g)

    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))
    # The crop is a pure index operation: same result on uint8 and on float copies of the images.
    torch.testing.assert_close(
        random_crop(x.float(), 4, torch.Generator().manual_seed(3)),
        random_crop(x, 4, torch.Generator().manual_seed(3)).float(),
    )


def test_normalize_golden():
    x = torch.tensor([[[[0]], [[255]], [[51]]]], dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    torch.testing.assert_close(out.flatten(), torch.tensor([-2.0, 1.0, -0.3]))


# ---------------------------------------------------------------- loader


def _loader(n=40, batch=8, **kw) -> TensorLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.arange(n) % 5
    return TensorLoader(images, labels, batch, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255), **kw)


def test_epoch_permutations_cover_the_set_and_differ():
    loader = _loader(train=True, augment=False)
    seen = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        idx = torch.cat([b.index for b in loader])
        assert len(idx) == 40 and len(set(idx.tolist())) == 40
        seen.append(idx)
    assert not torch.equal(seen[0], seen[1])
    batch = next(iter(loader))
    assert torch.equal(batch.input[:, 0, 0, 0].round().long(), batch.index)  # pixel value = dataset index
    assert torch.equal(batch.target, batch.index % 5)


def test_rank_shards_are_disjoint_and_cover_the_epoch():
    shards = []
    for rank in range(3):
        loader = _loader(n=40, batch=4, train=True, augment=False, rank=rank, world_size=3)
        loader.set_epoch(2)
        shards.append(torch.cat([b.index for b in loader]).tolist())
    assert all(len(s) == 12 for s in shards)  # 40 // 3 = 13 per rank → 3 full batches of 4
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    assert len({i for s in shards for i in s}) == 36


def test_set_epoch_start_batch_replays_the_tail_exactly():
    loader = _loader(train=True, augment=True)
    loader.set_epoch(3)
    full = list(loader)
    loader.set_epoch(3, start_batch=2)
    tail = list(loader)
    assert len(tail) == len(full) - 2
    for a, b in zip(full[2:], tail, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.input, b.input)
    loader.set_epoch(3)
    assert torch.equal(next(iter(loader)).input, full[0].input)


def test_resume_on_a_sharded_rank_and_channels_last():
    loader = _loader(n=40, batch=4, train=True, augment=True, rank=1, world_size=2, channels_last=True, seed=7)
    loader.set_epoch(1)
    full = list(loader)
    assert len(full) == len(loader) == 5
    assert full[0].input.is_contiguous(memory_format=torch.channels_last)
    loader.set_epoch(1, start_batch=3)
    tail = list(loader)
    assert [b.index.tolist() for b in tail] == [b.index.tolist() for b in full[3:]]
    assert all(torch.equal(a.input, b.input) for a, b in zip(full[3:], tail, strict=True))
    other = _loader(n=40, batch=4, train=True, augment=True, rank=0, world_size=2, seed=7)
    other.set_epoch(1)
    assert not set(torch.cat([b.index for b in other]).tolist()) & set(torch.cat([b.index for b in full]).tolist())


def test_test_loader_yields_every_sample_once_in_order():
    loader = _loader(n=43, batch=8, train=False)
    idx = torch.cat([b.index for b in loader])
    assert torch.equal(idx, torch.arange(43)) and len(loader) == 6


def test_jda_views_ride_along(tmp_path):
    bundle = build_data("embedded", batch_size=16, train_subset=64, test_subset=20, views="jda", jda_p=1.0)
    batch = next(iter(bundle.train))
    assert len(batch.views) == 1 and batch.views[0].shape == batch.input.shape
    assert not torch.equal(batch.views[0], batch.input)
    assert next(iter(bundle.test)).views == ()


# ---------------------------------------------------------------- subsets, embedded, npz


def test_balanced_subset():
    labels = np.repeat(np.arange(4), [50, 30, 10, 5])
    idx = balanced_subset(labels, 20)
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.tolist() == [5, 5, 5, 5] and np.all(np.diff(idx) > 0)
    idx = balanced_subset(labels, 34)
    assert sorted(np.bincount(labels[idx], minlength=4).tolist()) == [5, 9, 10, 10]
    assert np.array_equal(balanced_subset(labels, 20), balanced_subset(labels, 20))
    assert len(balanced_subset(labels, None)) == 95


def test_embedded_subset_ships_in_the_package():
    asset = Path(__import__("kdforge").__file__).parent / "data" / "assets" / "cifar10_subset.npz"
    assert asset.stat().st_size <= 5 * 1024 * 1024
    bundle = build_data("embedded", batch_size=100)
    assert bundle.num_train == 10_000 and bundle.test.num_samples == 2_000 and bundle.num_classes == 10
    assert np.bincount(bundle.train.labels.numpy()).tolist() == [1000] * 10
    assert np.bincount(bundle.test.labels.numpy()).tolist() == [200] * 10
    assert bundle.classes[0] == "airplane" and bundle.image_size == 32
    assert {"embedded", "cifar10", "cifar100", "cifar10_jpeg", "folder", "imagenet"} <= set(list_datasets())


@pytest.mark.skipif(not SHARED_CIFAR10.is_file(), reason="../shared/data/cifar10 is not available")
def test_cifar10_jpeg_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    bundle = build_data("cifar10_jpeg", root=str(SHARED_CIFAR10.parent), train_subset=100, test_subset=50)
    assert bundle.num_train == 100 and bundle.test.num_samples == 50
    assert list((tmp_path / "cache").glob("*.decoded.npz"))  # decoded once, cached
    again = build_data("cifar10_jpeg", root=str(SHARED_CIFAR10), train_subset=100, test_subset=50)
    assert torch.equal(again.train.images, bundle.train.images)


def _jpeg_npz(path: Path, n: int = 12, corrupt: int | None = None) -> np.ndarray:
    # Smooth images (gradients, a per-image blue level): JPEG keeps them close, so a decode mix-up would show.
    ramp = np.linspace(0, 255, 32)
    images = np.stack(
        [np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], np.full((32, 32), 20.0 * i)), -1) for i in range(n)]
    ).astype(np.uint8)
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    if corrupt is not None:
        blobs[corrupt] = np.frombuffer(b"\xff\xd8 not really a jpeg", dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    blob = np.concatenate(blobs)
    np.savez(
        path,
        train_jpeg=blob,
        train_offsets=offsets,
        train_labels=np.arange(n) % 2,
        test_jpeg=blob,
        test_offsets=offsets,
        test_labels=np.arange(n) % 2,
        classes=np.array(["a", "b"]),
    )
    return images


def test_jpeg_npz_parallel_decode_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    images = _jpeg_npz(tmp_path / "small.npz")
    with np.load(tmp_path / "small.npz") as z:
        serial = _decode_jpegs(z["train_jpeg"], z["train_offsets"], "x", workers=1)
        parallel = _decode_jpegs(z["train_jpeg"], z["train_offsets"], "x", workers=2)
    assert np.array_equal(serial, parallel) and serial.shape == (12, 3, 32, 32)
    assert np.abs(serial.transpose(0, 2, 3, 1).astype(int) - images).mean() < 4  # JPEG is lossy, not wrong
    data = load_jpeg_npz(tmp_path / "small.npz")
    assert np.array_equal(data.train_images, serial) and data.classes == ["a", "b"]
    assert len(list((tmp_path / "cache").glob("small-*.decoded.npz"))) == 1
    assert np.array_equal(load_jpeg_npz(tmp_path / "small.npz").train_images, serial)  # from the cache
    cached = next((tmp_path / "cache").glob("small-*.decoded.npz"))
    cached.write_bytes(cached.read_bytes()[:100])  # a damaged cache is decoded again and rewritten
    assert np.array_equal(load_jpeg_npz(tmp_path / "small.npz").train_images, serial)
    assert np.array_equal(load_jpeg_npz(tmp_path / "small.npz").train_images, serial)
    # A cache location that cannot be written (here: below a file) only means decoding every time.
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "blocker" / "cache"))
    assert np.array_equal(load_jpeg_npz(tmp_path / "small.npz").train_images, serial)


def test_corrupt_jpeg_in_npz_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    _jpeg_npz(tmp_path / "bad.npz", corrupt=5)
    with np.load(tmp_path / "bad.npz") as z:
        for workers in (1, 2):
            with pytest.raises(DataError, match=r"bad.npz.*image 5 is not a readable JPEG"):
                _decode_jpegs(z["train_jpeg"], z["train_offsets"], f"{tmp_path / 'bad.npz'}", workers=workers)
    with pytest.raises(DataError, match="image 5"):
        build_data("cifar10_jpeg", root=str(tmp_path / "bad.npz"))


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match="needs data.root"):
        build_data("cifar10_jpeg")
    bad = tmp_path / "x.npz"
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(DataError, match="lacks train_jpeg"):
        build_data("cifar10_jpeg", root=str(bad))
    bad.write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="is not a readable .npz file"):
        build_data("cifar10_jpeg", root=str(bad))


# ---------------------------------------------------------------- image folders


def _write_folder(root: Path, classes=("cat", "dog", "eel"), per_class=4) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = np.full((20 + i, 30, 3), 40 * k, dtype=np.uint8) + rng.integers(
                    0, 5, (20 + i, 30, 3), dtype=np.uint8
                )
                Image.fromarray(arr).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_dataset(tmp_path):
    _write_folder(tmp_path)
    bundle = build_data("folder", root=str(tmp_path), image_size=16, batch_size=4, eval_batch_size=5, num_workers=0)
    assert bundle.classes == ["cat", "dog", "eel"] and bundle.num_classes == 3 and bundle.num_train == 12
    batches = list(bundle.test)
    assert [len(b) for b in batches] == [5, 5, 2]
    assert torch.cat([b.target for b in batches]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batches[0].input.shape == (5, 3, 16, 16)
    bundle.train.set_epoch(0)
    first = [b.index.tolist() for b in bundle.train]
    assert len(first) == 3 and len({i for b in first for i in b}) == 12
    bundle.train.set_epoch(0, start_batch=1)
    assert [b.index.tolist() for b in bundle.train] == first[1:]


def test_image_folder_dataset_scans_a_split_folder(tmp_path):
    _write_folder(tmp_path, classes=("b", "a"), per_class=2)
    ds = ImageFolderDataset(tmp_path / "val", 12, train=False)
    assert ds.classes == ["a", "b"] and len(ds) == 4
    image, label, index, error = ds[(3, 0)]
    assert image.shape == (3, 12, 12) and image.dtype == torch.uint8 and label == 1 and index == 3 and not error


def test_image_folder_with_workers(tmp_path):
    _write_folder(tmp_path, per_class=3)
    bundle = build_data("folder", root=str(tmp_path), image_size=8, batch_size=3, num_workers=2)
    bundle.train.set_epoch(1)
    a = [b.input for b in bundle.train]
    bundle.train.set_epoch(1)
    b = [b.input for b in bundle.train]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # augmentation independent of workers


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="needs data.root"):
        build_data("folder")
    with pytest.raises(DataError, match="train does not exist"):
        build_data("folder", root=str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        build_data("folder", root=str(tmp_path))
    _write_folder(tmp_path / "ok")
    (tmp_path / "ok" / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        build_data("folder", root=str(tmp_path / "ok"))
    (tmp_path / "ok" / "train" / "empty").rmdir()
    (tmp_path / "ok" / "val" / "dog" / "0.jpg").write_bytes(b"not a jpeg")
    bundle = build_data("folder", root=str(tmp_path / "ok"), image_size=8, num_workers=0, batch_size=2)
    with pytest.raises(DataError, match=r"cannot read image .*val/dog/0.jpg"):
        list(bundle.test)


def test_corrupt_folder_images_fail_or_are_skipped_and_counted(tmp_path):
    from kdforge.config import config_from_dict
    from kdforge.errors import ConfigError
    from kdforge.validation import validate

    _write_folder(tmp_path)
    (tmp_path / "train" / "dog" / "0.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "train" / "eel" / "2.jpg").write_bytes(b"")
    kwargs = {"root": str(tmp_path), "image_size": 8, "num_workers": 0, "batch_size": 4}
    with pytest.raises(DataError, match=r"cannot read image .*train/(dog/0|eel/2)\.jpg.*bad_images=skip"):
        list(build_data("folder", **kwargs).train)
    bundle = build_data("folder", bad_images="skip", **kwargs)
    samples = bundle.train.dataset.samples
    for epoch in range(2):
        bundle.train.set_epoch(epoch)
        batches = list(bundle.train)
        seen = {(samples[i][0].parent.name, samples[i][0].name) for b in batches for i in b.index.tolist()}
        assert {(p.parent.name, p.name) for p, _ in samples} - seen == {("dog", "0.jpg"), ("eel", "2.jpg")}
        assert sum(len(b) for b in batches) == 10 and bundle.train.skipped_images == 2 * (epoch + 1)
        for b in batches:  # the survivors keep their own labels and indices
            assert b.input.shape[0] == b.target.shape[0] == b.index.shape[0]
            assert [samples[i][1] for i in b.index.tolist()] == b.target.tolist()
    data = {"name": "embedded", "bad_images": "skip"}
    cfg = config_from_dict({"model": {"name": "resnet8"}, "method": {"name": "vanilla"}, "data": data})
    with pytest.raises(ConfigError, match="bad_images applies to image folders"):
        validate(cfg, "train")
