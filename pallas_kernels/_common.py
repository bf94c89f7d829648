"""Small helpers shared by the Pallas kernels: tile-size checks, the interpret-mode default, the
``impl`` names every op's ``api`` accepts, and the A10G shared-memory budget."""
from __future__ import annotations

from typing import Optional

import jax

A10G_SMEM_BYTES = 101_376
"""Shared memory one block may use on an A10G (sm_86): 99 KiB."""

IMPLS = ("auto", "pallas_triton", "xla")
"""Implementations an op's ``api`` entry point accepts: ``"pallas_triton"`` (the Pallas kernel,
Triton backend), ``"xla"`` (the pure-jnp reference) or ``"auto"`` (see :func:`resolve_impl`)."""


def resolve_impl(impl: str, *, field: str = "impl", platform: Optional[str] = None) -> str:
    """The concrete implementation for ``impl``: ``"auto"`` is ``"pallas_triton"`` on a GPU
    (``platform``, default ``jax.default_backend()``) and ``"xla"`` elsewhere; ``"pallas_triton"``
    and ``"xla"`` are returned as they are. Anything else raises ``ValueError`` naming ``field``."""
    if impl == "auto":
        platform = jax.default_backend() if platform is None else platform
        return "pallas_triton" if platform == "gpu" else "xla"
    if impl in ("pallas_triton", "xla"):
        return impl
    raise ValueError(f"{field}: expected one of {IMPLS}, got {impl!r}")


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_tiling(config, blocks) -> None:
    """Validate a kernel config: each field in ``blocks`` a power of two >= 16 (Triton tile sizes),
    ``num_warps`` a power of two <= 16, ``num_stages`` >= 1. Errors name ``Class.field``."""
    cls = type(config).__name__
    for name in blocks:
        value = getattr(config, name)
        if not is_pow2(value) or value < 16:
            raise ValueError(f"{cls}.{name}: expected a power of two >= 16, got {value}")
    if not is_pow2(config.num_warps) or config.num_warps > 16:
        raise ValueError(f"{cls}.num_warps: expected 1, 2, 4, 8 or 16, got {config.num_warps}")
    if config.num_stages < 1:
        raise ValueError(f"{cls}.num_stages: expected >= 1, got {config.num_stages}")


def default_interpret() -> bool:
    """Pallas interpret mode unless a GPU backend is present (CPU tests run the kernels there)."""
    return jax.default_backend() != "gpu"
