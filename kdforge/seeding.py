"""Seed mixing: one deterministic integer hash that every layer (data, methods, the engine) derives streams from.

A leaf module (no kdforge import), so a method can seed a per-rank stream without importing the data package.
"""

from __future__ import annotations

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads nearby (seed, epoch, ...) tuples over the seed space


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (a tiny hash, stable across processes and Python versions)."""
    h = 0
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


__all__ = ["mix_seed"]
