"""Pure, typed loss functions grouped by family; no state, no modules, float32 inside."""

from kdforge.losses.logit import (
    AlphaMode,
    LogitNorm,
    adaptive_alpha_divergence,
    alpha_divergence,
    alpha_kd_loss,
    ccd_soft_loss,
    cross_entropy,
    dkd_loss,
    kd_loss,
    kl_div,
    layer_norm_logits,
    normalize_logits,
    standardize_logits,
)

__all__ = [
    "AlphaMode",
    "LogitNorm",
    "adaptive_alpha_divergence",
    "alpha_divergence",
    "alpha_kd_loss",
    "ccd_soft_loss",
    "cross_entropy",
    "dkd_loss",
    "kd_loss",
    "kl_div",
    "layer_norm_logits",
    "normalize_logits",
    "standardize_logits",
]
