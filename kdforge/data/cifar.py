"""CIFAR-10/100: the official python-format archives (read, download, verify) and the JPEG ``.npz`` format.

Both readers return :class:`ArrayData`: uint8 images ``[N, 3, 32, 32]`` (channels first, as the training loader
keeps them) and int64 labels, for the train and test splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import mmap
import multiprocessing as mp
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kdforge.errors import DataError


@dataclass
class ArrayData:
    """A decoded image-classification dataset held in memory."""

    train_images: np.ndarray  # [N, 3, H, W] uint8
    train_labels: np.ndarray  # [N] int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


@dataclass(frozen=True)
class ArchiveSpec:
    """Where an official CIFAR archive comes from and what is inside."""

    name: str
    filename: str
    folder: str
    url: str
    md5: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: bytes
    names_key: bytes


CIFAR10 = ArchiveSpec(
    name="cifar10",
    filename="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_member="test_batch",
    meta_member="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
)
CIFAR100 = ArchiveSpec(
    name="cifar100",
    filename="cifar-100-python.tar.gz",
    folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_members=("train",),
    test_member="test",
    meta_member="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
)


def default_root() -> Path:
    """``$KDFORGE_DATA`` or ``~/.cache/kdforge/data``."""
    return Path(os.environ.get("KDFORGE_DATA", Path.home() / ".cache" / "kdforge" / "data"))


def cache_dir() -> Path:
    """``$KDFORGE_CACHE`` or ``~/.cache/kdforge`` (decoded-image caches)."""
    return Path(os.environ.get("KDFORGE_CACHE", Path.home() / ".cache" / "kdforge"))


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source(spec: ArchiveSpec, url: str | None, md5: str | None) -> tuple[str, str]:
    # Environment overrides let a mirror (or a test server) stand in for the official host.
    env = spec.name.upper()
    return (
        url or os.environ.get(f"KDFORGE_{env}_URL", spec.url),
        md5 or os.environ.get(f"KDFORGE_{env}_MD5", spec.md5),
    )


def download(url: str, dest: Path, md5: str, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a temporary file in the same folder, check its MD5, then rename.

    On any failure (network, checksum, Ctrl-C) the temporary file is removed and ``dest`` is left untouched.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.md5()
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}", disable=not progress
                ) as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            if isinstance(err, urllib.error.HTTPError):
                reason = f"HTTP {err.code} {err.reason}"
            else:
                reason = getattr(err, "reason", None) or err
            raise DataError(
                f"could not download {url} ({reason}); put {dest.name} into {dest.parent} by hand or check the network"
            ) from None
        if digest.hexdigest() != md5:
            raise DataError(
                f"{url} downloaded with MD5 {digest.hexdigest()}, expected {md5}: the file is corrupt or not the "
                f"official archive; nothing was kept, try again"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _unpickle(data: bytes, what: str) -> dict:
    # The official CIFAR format is pickle; archives are MD5-checked before they are read.
    try:
        obj = pickle.loads(data, encoding="bytes")
    except Exception as err:
        raise DataError(
            f"{what} is not a readable CIFAR batch ({type(err).__name__}); re-download the archive"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{what} is not a CIFAR batch; re-download the archive")
    return obj


def _batches_from_tar(path: Path, spec: ArchiveSpec) -> dict[str, dict]:
    wanted = {*spec.train_members, spec.test_member, spec.meta_member}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                # Only the known members of the known folder are read; nothing is extracted to disk.
                if member.isfile() and len(parts) == 2 and parts[0] == spec.folder and parts[1] in wanted:
                    f = tar.extractfile(member)
                    assert f is not None
                    found[parts[1]] = _unpickle(f.read(), f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .tar.gz archive ({err}); delete it and download it again") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{path} is not the {spec.name} python archive: {spec.folder}/{missing[0]} is missing; "
            f"get {spec.filename} from {spec.url}"
        )
    return found


def _batches_from_folder(folder: Path, spec: ArchiveSpec) -> dict[str, dict]:
    found = {}
    for name in (*spec.train_members, spec.test_member, spec.meta_member):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder} is missing {name}; extract {spec.filename} again or remove the folder")
        found[name] = _unpickle(path.read_bytes(), str(path))
    return found


def _to_arrays(batch: dict, spec: ArchiveSpec, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[spec.label_key], dtype=np.int64)
    except KeyError as err:
        raise DataError(f"{what} has no {err.args[0]!r} entry: not a {spec.name} batch") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{what} holds data of shape {data.shape}, expected [N, 3072]: not a {spec.name} batch")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major: exactly NCHW.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(
    spec: ArchiveSpec,
    root: str | Path | None = None,
    *,
    download_missing: bool = False,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> ArrayData:
    """Read CIFAR-10/100 from ``root`` (the ``.tar.gz`` or its extracted folder), downloading it when asked.

    Args:
        spec: :data:`CIFAR10` or :data:`CIFAR100`.
        root: folder holding the archive (default :func:`default_root`).
        download_missing: fetch the archive when it is not in ``root``.
        url, md5: override the official source (also ``KDFORGE_CIFAR10_URL``/``KDFORGE_CIFAR10_MD5`` etc.).
        progress: show a download progress bar.
    """
    root = Path(root) if root is not None else default_root()
    url, md5 = _source(spec, url, md5)
    archive, folder = root / spec.filename, root / spec.folder
    if folder.is_dir():
        batches = _batches_from_folder(folder, spec)
    else:
        if not archive.is_file():
            if not download_missing:
                raise DataError(
                    f"{spec.name} not found: put {spec.filename} (from {url}) into {root}, or set data.download=true"
                )
            download(url, archive, md5, progress=progress)
        elif file_md5(archive) != md5:
            raise DataError(
                f"{archive} has the wrong MD5 checksum (expected {md5}): the file is corrupt or truncated; "
                f"delete it and download it again (data.download=true)"
            )
        batches = _batches_from_tar(archive, spec)
    train = [_to_arrays(batches[m], spec, m) for m in spec.train_members]
    test_x, test_y = _to_arrays(batches[spec.test_member], spec, spec.test_member)
    names = batches[spec.meta_member].get(spec.names_key)
    if names is None:
        raise DataError(f"{spec.meta_member} has no {spec.names_key!r}: not a {spec.name} archive")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ArrayData(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y, classes
    )


# ---------------------------------------------------------------------------------------------- the JPEG .npz


# The blob and output buffer of a parallel decode, inherited by forked workers (nothing is pickled per image).
_SHARED: dict[str, object] = {}


def _decode_into(out: np.ndarray, blob: bytes, offsets: np.ndarray, start: int, stop: int, what: str) -> None:
    """Decode images ``start..stop-1`` of ``blob`` into ``out[start:stop]`` (``[N, 3, H, W]`` uint8)."""
    for i in range(start, stop):
        try:
            img = Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]]), formats=("JPEG",))
            arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
            out[i] = arr.transpose(2, 0, 1)
        except (OSError, ValueError) as err:
            raise DataError(f"{what}: image {i} is not a readable JPEG ({err}); the file is corrupt") from None


def _decode_chunk(bounds: tuple[int, int]) -> None:
    _decode_into(_SHARED["out"], _SHARED["blob"], _SHARED["offsets"], *bounds, _SHARED["what"])  # type: ignore[arg-type]


def _decode_workers(n: int) -> int:
    """Processes for decoding ``n`` images: several only for large sets, where the fork cost pays off."""
    # Daemonic processes (DataLoader workers) may not have children; fork is Linux/macOS only.
    if n < 5_000 or "fork" not in mp.get_all_start_methods() or mp.current_process().daemon:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus))


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, what: str, workers: int | None = None) -> np.ndarray:
    """Decode the concatenated JPEGs of one split.

    Args:
        blob: ``[total bytes]`` uint8, the JPEG files back to back.
        offsets: ``[N + 1]`` int64; image ``i`` is ``blob[offsets[i]:offsets[i+1]]``.
        what: names the file in error messages.
        workers: decoding processes (default :func:`_decode_workers`); 1 decodes in this process.

    Returns:
        ``[N, 3, H, W]`` uint8 (all images must share one size, as CIFAR's do).
    """
    n = len(offsets) - 1
    if n <= 0:
        raise DataError(f"{what} holds no images; the file is incomplete")
    data = blob.tobytes()
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) <= 0):
        raise DataError(f"{what}: the offsets do not cut the JPEG bytes into images; the file is corrupt")
    try:
        with Image.open(io.BytesIO(data[: offsets[1]])) as first:
            w, h = first.size
    except (OSError, ValueError) as err:
        raise DataError(f"{what}: image 0 is not a readable JPEG ({err}); the file is corrupt") from None
    workers = _decode_workers(n) if workers is None else workers
    if workers <= 1:
        out = np.empty((n, 3, h, w), dtype=np.uint8)
        _decode_into(out, data, offsets, 0, n, what)
        return out
    # Forked workers write into one anonymous shared mapping: no per-chunk pickling of decoded pixels, and no
    # re-import of torch in the children (which spawn would cost, about a second each).
    buffer = mmap.mmap(-1, n * 3 * h * w)
    shared = np.frombuffer(buffer, dtype=np.uint8).reshape(n, 3, h, w)
    _SHARED.update(out=shared, blob=data, offsets=offsets, what=what)
    chunks = [(k * n // (4 * workers), (k + 1) * n // (4 * workers)) for k in range(4 * workers)]
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a multi-threaded process; the children only run Pillow/NumPy.
            warnings.simplefilter("ignore", DeprecationWarning)
            with mp.get_context("fork").Pool(workers) as pool:
                pool.map(_decode_chunk, chunks)
        return shared.copy()
    finally:
        _SHARED.clear()
        del shared
        with contextlib.suppress(BufferError):  # a still-referenced view only delays the unmap to garbage collection
            buffer.close()


def _npz_cache_path(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"{path.stem}-{key}.decoded.npz"


def load_jpeg_npz(path: str | Path, *, cache: bool = True) -> ArrayData:
    """Read the JPEG ``.npz`` format (docs/DATA.md): decode once with Pillow, then reuse a cached uint8 copy.

    The cache lives in :func:`cache_dir`, keyed by the file's path, size and modification time, and is written
    atomically; when the cache folder is not writable the images are decoded every time.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.npz"))
        if len(candidates) != 1:
            raise DataError(f"{path} should hold exactly one .npz file (found {len(candidates)}); pass the file")
        path = candidates[0]
    if not path.is_file():
        raise DataError(f"{path} does not exist; data.root must be the JPEG .npz file or its folder")
    cached = _npz_cache_path(path) if cache else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as z:
                return ArrayData(
                    z["train_images"],
                    z["train_labels"],
                    z["test_images"],
                    z["test_labels"],
                    [str(c) for c in z["classes"]],
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache (disk full, killed writer of an older version) is rebuilt from the source
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not a readable .npz file ({err})") from None
    required = ["train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels", "classes"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a kdforge JPEG .npz file (docs/DATA.md)")
    data = ArrayData(
        _decode_jpegs(arrays["train_jpeg"], arrays["train_offsets"], f"{path} (train)"),
        arrays["train_labels"].astype(np.int64),
        _decode_jpegs(arrays["test_jpeg"], arrays["test_offsets"], f"{path} (test)"),
        arrays["test_labels"].astype(np.int64),
        [str(c) for c in arrays["classes"]],
    )
    if cached is not None:
        _write_cache(cached, data)
    return data


def _write_cache(path: Path, data: ArrayData) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                train_images=data.train_images,
                train_labels=data.train_labels,
                test_images=data.test_images,
                test_labels=data.test_labels,
                classes=np.array(data.classes),
            )
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder only costs the decode next time
    finally:
        with contextlib.suppress(OSError):  # e.g. the cache "folder" is a file: there is no temporary file either
            tmp.unlink(missing_ok=True)


def write_jpeg_npz(path: str | Path, data: dict[str, np.ndarray]) -> None:
    """Write arrays in the JPEG ``.npz`` layout atomically (used by the embedded-subset builder and tests)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **data)
    os.replace(tmp, path)


__all__ = [
    "CIFAR10",
    "CIFAR100",
    "ArchiveSpec",
    "ArrayData",
    "default_root",
    "download",
    "load_cifar",
    "load_jpeg_npz",
    "write_jpeg_npz",
]
