"""Helpers shared by the kernels (``pallas_kernels._common``): impl names, tile checks."""
from __future__ import annotations

import dataclasses

import pytest

from pallas_kernels._common import (
    A10G_SMEM_BYTES,
    IMPLS,
    check_tiling,
    is_pow2,
    next_pow2,
    resolve_impl,
)


def test_resolve_impl():
    assert IMPLS == ("auto", "pallas_triton", "xla")
    assert resolve_impl("auto", platform="gpu") == "pallas_triton"
    assert resolve_impl("auto", platform="cpu") == "xla"
    assert resolve_impl("auto", platform="tpu") == "xla"
    for impl in ("pallas_triton", "xla"):
        assert resolve_impl(impl, platform="cpu") == impl
        assert resolve_impl(impl, platform="gpu") == impl
    assert resolve_impl("auto") in ("pallas_triton", "xla")
    with pytest.raises(ValueError, match=r"impl: expected one of \('auto', 'pallas_triton', 'xla'\), "
                                         r"got 'pallas'"):
        resolve_impl("pallas")
    with pytest.raises(ValueError, match="model.encoder_impl: expected one of"):
        resolve_impl("skut", field="model.encoder_impl")


def test_pow2_helpers_and_tiling_checks():
    assert [is_pow2(n) for n in (0, 1, 2, 3, 16, 48)] == [False, True, True, False, True, False]
    assert [next_pow2(n) for n in (1, 2, 3, 17, 64)] == [1, 2, 4, 32, 64]
    assert A10G_SMEM_BYTES == 99 * 1024

    @dataclasses.dataclass
    class Cfg:
        block: int = 16
        num_warps: int = 4
        num_stages: int = 1

    check_tiling(Cfg(), ("block",))
    for bad, field in ((Cfg(block=8), "Cfg.block"), (Cfg(num_warps=32), "Cfg.num_warps"),
                       (Cfg(num_stages=0), "Cfg.num_stages")):
        with pytest.raises(ValueError, match=field):
            check_tiling(bad, ("block",))
