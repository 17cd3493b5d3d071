"""``kdforge predict``: a trained classifier on a folder (or a list) of images, to a CSV.

The network can be a run directory, a weight file or training checkpoint inside one, or a file that ``kdforge
export`` wrote (TorchScript ``.pt``, ONNX ``.onnx``; ONNX needs the ``onnx`` extra). Preprocessing is the
evaluation transform of the run's own dataset, read from the run's saved config, so a deployed student sees its
inputs exactly as it saw its test split:

- image-folder datasets (``folder``, ``imagenet``): shorter side to ``S/0.875``, then the central ``S×S`` crop;
- in-memory datasets (``cifar*``, ``embedded``): the whole image resized to ``S×S`` (their images are ``S×S``);

then the dataset's mean/std normalisation. Class names are the dataset's. Images that cannot be decoded are listed
and skipped (``on_error="skip"``, the default) or stop the run (``"stop"``); the CSV is written atomically only
when the run ends, so a stopped run leaves no half-written file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kdforge.data.cifar import ArrayData
from kdforge.data.folder import EXTENSIONS, scan_folder
from kdforge.engine.checkpoint import atomic_write_text
from kdforge.errors import DataError, KDForgeError
from kdforge.registry import DATASETS


@dataclass(frozen=True)
class Preprocess:
    """How a run turns an image file into a network input.

    Attributes:
        image_size: the input side ``S``.
        mean, std: per-channel normalisation (of ``[0, 1]`` pixel values).
        crop: ``center`` (shorter side to ``S/0.875``, central ``S×S``) or ``resize`` (the whole image to ``S×S``).
        classes: class names in label order.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: Literal["center", "resize"]
    classes: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop": self.crop,
            "classes": list(self.classes),
        }

    @classmethod
    def from_json(cls, d: dict) -> Preprocess:
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), d["crop"], tuple(d["classes"]))

    def load(self, path: Path) -> Tensor:
        """The ``[3, S, S]`` float32 normalised input for the image at ``path`` (raises ``OSError``/``ValueError``
        for an image that cannot be decoded)."""
        s = self.image_size
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.crop == "center":
            short = round(s / 0.875)
            w, h = img.size
            nw, nh = (short, max(1, round(h * short / w))) if w <= h else (max(1, round(w * short / h)), short)
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        elif img.size != (s, s):
            img = img.resize((s, s), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std


def preprocess_from_config(data: dict, image_size: int) -> Preprocess:
    """The :class:`Preprocess` of a run whose saved ``data`` config section is ``data``.

    Builds the dataset's description only (an in-memory dataset's arrays are read once for its class names; an image
    folder is scanned, not decoded).
    """
    name = data.get("name", "")
    builder = DATASETS.get(name)
    source, mean, std = builder(data.get("root"), False)
    if isinstance(source, ArrayData):
        return Preprocess(image_size, tuple(mean), tuple(std), "resize", tuple(source.classes))
    _, classes = scan_folder(Path(data["root"]) / "train")
    return Preprocess(image_size, tuple(mean), tuple(std), "center", tuple(classes))


@dataclass
class Predictor:
    """A network ready to score batches of preprocessed images.

    Attributes:
        forward: maps a ``[B, 3, S, S]`` float32 batch to ``[B, K]`` logits.
        preprocess: the run's input transform and class names.
        source: the file the network came from.
    """

    forward: Callable[[Tensor], Tensor]
    preprocess: Preprocess
    source: Path


def _run_dir_of(path: Path) -> Path | None:
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def _preprocess_for(path: Path, image_size: int | None = None) -> Preprocess:
    # An export folder carries the preprocessing in export.json; a run directory in its config.yaml.
    for folder in (path if path.is_dir() else path.parent, path.parent):
        meta = folder / "export.json"
        if meta.is_file():
            saved = json.loads(meta.read_text()).get("preprocess")
            if saved:
                return Preprocess.from_json(saved)
    run = _run_dir_of(path)
    if run is None:
        raise KDForgeError(
            f"cannot find the run that produced {path} (no config.yaml beside it or above it); predict needs the "
            "run's config to preprocess images the way training did"
        )
    from kdforge.config import load_yaml
    from kdforge.export import _image_size

    cfg = load_yaml(run / "config.yaml")
    data = cfg.get("data") or {}
    size = image_size or _image_size(data.get("image_size"), data.get("name", ""), (cfg.get("model") or {})["name"])
    return preprocess_from_config(data, size)


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """A :class:`Predictor` from a run directory, weight file, TorchScript file or ONNX file."""
    path = Path(path)
    if not path.exists():
        raise KDForgeError(f"{path} does not exist; pass a run directory, student.pt, or an exported .pt/.onnx file")
    device = torch.device(device)
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise KDForgeError(
                "predicting with an ONNX file needs the onnx extra: pip install 'kdforge[onnx]'"
            ) from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])

        return Predictor(run_onnx, _preprocess_for(path), path)
    if path.is_file() and path.name.endswith(".torchscript.pt"):
        module = torch.jit.load(str(path), map_location=device).eval()
        return Predictor(_no_grad(module, device), _preprocess_for(path), path)
    from kdforge.export import load_run_model

    loaded = load_run_model(path)
    module = loaded.model.to(device).eval()
    return Predictor(_no_grad(module, device), _preprocess_for(path, loaded.image_size), loaded.weights)


def _no_grad(module: Callable[[Tensor], Tensor], device: torch.device) -> Callable[[Tensor], Tensor]:
    @torch.inference_mode()
    def run(x: Tensor) -> Tensor:
        return module(x.to(device)).float().cpu()

    return run


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: folders (searched recursively, sorted), image files, and ``.txt`` lists
    (one path per line, relative to the list's folder)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    entry = Path(line.strip())
                    files.append(entry if entry.is_absolute() else p.parent / entry)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; pass image files, folders of images or a .txt list of paths")
    if not files:
        raise DataError(
            f"no images found in {', '.join(map(str, inputs))} (extensions: {', '.join(sorted(EXTENSIONS))})"
        )
    return files


@dataclass
class PredictResult:
    """What :func:`predict` produced: one row per scored image and the images it could not read."""

    rows: list[dict[str, object]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _batches(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def predict(
    predictor: Predictor,
    files: list[Path],
    *,
    topk: int = 1,
    batch_size: int = 64,
    on_error: Literal["skip", "stop"] = "skip",
    progress: bool = True,
) -> PredictResult:
    """Scores ``files``: per image the top-``k`` classes and their softmax confidences.

    Raises:
        DataError: an unreadable image with ``on_error="stop"`` (the message names it).
    """
    if topk < 1:
        raise KDForgeError(f"--topk must be at least 1, got {topk}")
    classes = predictor.preprocess.classes
    k = min(topk, len(classes))
    result = PredictResult()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), unit="img", desc="predict", dynamic_ncols=True)
    try:
        for chunk in _batches(files, batch_size):
            inputs, kept = [], []
            for f in chunk:
                try:
                    inputs.append(predictor.preprocess.load(f))
                    kept.append(f)
                except (OSError, ValueError, Image.DecompressionBombError) as err:
                    if on_error == "stop":
                        raise DataError(
                            f"cannot read image {f}: {err} (use --on-error skip to list and go on)"
                        ) from None
                    result.failed.append((f, str(err).splitlines()[0] if str(err) else type(err).__name__))
            if inputs:
                logits = predictor.forward(torch.stack(inputs))
                if logits.ndim != 2 or logits.shape[1] != len(classes):
                    raise KDForgeError(
                        f"the network gives outputs of shape {tuple(logits.shape)} but the run has {len(classes)} "
                        "classes; is this a classifier of that run?"
                    )
                conf, idx = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
                for f, c, i in zip(kept, conf.tolist(), idx.tolist(), strict=True):
                    row: dict[str, object] = {"file": str(f), "class": classes[i[0]], "confidence": c[0]}
                    for r in range(1, k):
                        row[f"class_{r + 1}"] = classes[i[r]]
                        row[f"confidence_{r + 1}"] = c[r]
                    result.rows.append(row)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return result


def write_csv(result: PredictResult, path: str | Path, topk: int) -> Path:
    """Writes the rows as CSV (``file,class,confidence[,class_2,confidence_2,...]``), atomically."""
    fields = ["file", "class", "confidence"]
    for r in range(2, topk + 1):
        fields += [f"class_{r}", f"confidence_{r}"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)
