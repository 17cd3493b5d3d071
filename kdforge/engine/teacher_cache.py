"""Teacher-output reuse: the frozen teacher's logits computed once per training input, then gathered every step.

A frozen teacher in eval mode is a fixed function, so if the input it is asked about for a sample is also fixed, its
answer can be computed once and replayed. That holds exactly when

- the training loader is a :class:`~kdforge.data.loader.TensorLoader` whose input for a dataset index is fixed:
  no augmentation (one input per sample), or replayed augmentation (``data.replay_views = K``: K fixed crop/flip views
  per sample, the batch naming each sample's view in ``Batch.view_id``), and no JDA views;
- the method declares ``teacher_cacheable``: its teacher's only job is the logits of ``batch.input``, asked through
  :meth:`~kdforge.methods.base.Method.teacher_outputs`, and the teacher is frozen in eval mode (so not ATF or
  bilateral KD, which fine-tune it, nor AMKD, which asks about adversarial inputs, nor feature methods).

Random crops drawn afresh every step (``data.augment=true`` without ``replay_views``) are never cached: the teacher
would then be answering a different question than the one the student is asked. The cache costs ``K·N·C·4`` bytes
on the training device (``K = max(replay_views, 1)``, ``N`` training samples, ``C`` classes) and one teacher pass over
``K·N`` images at fit start; each cached step then skips the teacher's forward entirely.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from kdforge.data.loader import TensorLoader
from kdforge.engine.env import autocast
from kdforge.errors import ConfigError
from kdforge.methods.base import Method


def _declares_cacheable(cls: type[Method]) -> bool:
    # The flag must be set on the class that defines forward_train or below it: a subclass that rewrites the step
    # (say, to read teacher features) without restating the flag does not inherit a promise it may break.
    mro = cls.__mro__
    step = next(i for i, c in enumerate(mro) if "forward_train" in c.__dict__)
    flag = next(i for i, c in enumerate(mro) if "teacher_cacheable" in c.__dict__)
    return flag <= step and cls.teacher_cacheable


def cache_blocker(method: nn.Module, data: Any) -> str | None:
    """Why caching the teacher's logits would not be exact for this method and data; ``None`` when it is."""
    name = type(method).__name__
    if not isinstance(method, Method) or method.teacher is None:
        return "the run has no frozen teacher"
    if method.trains_teacher:
        return f"method {name} fine-tunes its teacher, so the teacher's outputs change during training"
    if not _declares_cacheable(type(method)):
        return (
            f"method {name} asks its teacher for more than the logits of the training input (features, "
            "adversarial or extra views), so a cache could not replay them"
        )
    if method.teacher.training or any(p.requires_grad for p in method.teacher.parameters()):
        return "the teacher is not frozen in eval mode"
    loader = getattr(data, "train", None)
    if not isinstance(loader, TensorLoader):
        return "the training data is not an in-memory dataset (image folders decode and augment every sample anew)"
    if loader.views is not None:
        return "data.views=jda shows the teacher a freshly augmented view every step"
    if loader.augment and not loader.replay_views:
        return (
            "data.augment=true draws a fresh crop/flip every step; set data.replay_views=K (K fixed views per "
            "sample) or data.augment=false"
        )
    return None


def attach_teacher_cache(
    method: nn.Module, data: Any, *, mode: Literal["auto", "on", "off"], device: torch.device, dtype: torch.dtype
) -> bool:
    """Fill the frozen teacher's logits for every training input and attach them to ``method``, where exact.

    Every view ``v < max(replay_views, 1)`` of every training sample (all ``N``, in index order, in batches of the
    test loader's batch size) goes through ``method.teacher_logits`` under ``no_grad`` and the run's autocast
    ``dtype``, with exactly the preprocessing training applies; the logits are stored as float32 ``[V, N, C]`` and
    :meth:`~kdforge.methods.base.Method.teacher_outputs` gathers from them from then on. The cache is a plain
    attribute, outside ``state_dict`` and checkpoints, and is rebuilt whenever ``fit`` starts, resumes included: the
    fill is deterministic, so a resumed run stays bit-identical. Under DDP every rank fills the whole cache itself
    (sample ``n`` may land on any rank in a later epoch), which costs each rank the same one pass and no communication.

    Args:
        method: the method about to be trained (already on ``device``).
        data: the ``DataBundle`` (or any object with ``train``/``test`` loaders).
        mode: ``off`` detaches any cache; ``auto`` caches when exact and silently runs the teacher every step
            otherwise; ``on`` insists.
        device: the training device (autocast's device type).
        dtype: the run's autocast dtype (float32 = no autocast).

    Returns:
        Whether a cache is attached.

    Raises:
        ConfigError: ``mode="on"`` where reuse would not be exact; the message says why.
    """
    if isinstance(method, Method):
        method.set_teacher_cache(None)  # a cache from an earlier fit may no longer match
    if mode == "off":
        return False
    reason = cache_blocker(method, data)
    if reason is not None:
        if mode == "on":
            raise ConfigError(f"train.teacher_cache=on, but teacher outputs cannot be reused exactly: {reason}")
        return False
    assert isinstance(method, Method)
    loader: TensorLoader = data.train
    num_views = max(loader.replay_views, 1)
    batch_size = getattr(data.test, "batch_size", None) or loader.batch_size
    cache: torch.Tensor | None = None
    out_dtype = torch.float32
    with torch.no_grad(), autocast(device, dtype):
        for view in range(num_views):
            for batch in loader.iter_view(view, batch_size):
                logits = method.teacher_logits(batch.input)
                if cache is None:
                    shape = (num_views, loader.num_samples, logits.shape[1])
                    cache = torch.empty(shape, dtype=torch.float32, device=logits.device)
                    out_dtype = logits.dtype
                cache[view].index_copy_(0, batch.index, logits.float())
    assert cache is not None  # a TensorLoader always holds at least one sample
    method.set_teacher_cache(cache, out_dtype)
    return True


__all__ = ["attach_teacher_cache", "cache_blocker"]
