"""Profiling entry of the NN-search kernel, used only by ``bench/nn_search.py --profile``.

:func:`nn_search_stopped` launches the kernel of :mod:`pallas_kernels.nn_search.pallas_triton`
stopped after step 2 (bound + threshold) or step 3 (collect): a kernel function built here from
the same step functions as the shipped kernel, on the same launch (grid, block table, inputs), so
the difference in time between the two and the full kernel is the cost of the later steps. Its
output is not a search result: per candidate, T_lo (step 2, as an int32 key) or the number of
survivors (step 3, which may exceed the buffer's capacity: then the shipped kernel takes the
fallback).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.nn_search.config import NNSearchConfig
from pallas_kernels.nn_search.pallas_triton import (
    _Refs,
    _Static,
    _launch,
    _prepare,
    _step_collect,
    _steps_bound,
)

STOP_AFTER = (2, 3)
"""Steps the profiling kernel can stop after: 2 (T_lo) or 3 (the survivor counts)."""


def _stopped_kernel(*refs, st: _Static, stop_after: int):
    """Steps 1-2 (and 3 if ``stop_after == 3``) of the shipped kernel; per row, T_lo or the
    survivor count goes to column 0 of the index output."""
    r = _Refs(*refs)
    blk, value = _steps_bound(r, st)
    if stop_after == 3:
        _, value = _step_collect(r, st, blk, value)
    plgpu.store(r.idx.at[blk.out_rows, jnp.zeros((1, 1), jnp.int32)], value[:, None],
                mask=blk.row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("k", "stop_after", "config", "interpret"))
def nn_search_stopped(seq_q: jax.Array, offsets: jax.Array, lengths: jax.Array, cand: jax.Array,
                      cand_to_req: jax.Array, *, k: int, stop_after: int,
                      config: Optional[NNSearchConfig] = None,
                      interpret: Optional[bool] = None) -> jax.Array:
    """The kernel stopped after step ``stop_after`` (2 or 3), same arguments as
    :func:`~pallas_kernels.nn_search.pallas_triton.nn_search_pallas_triton`. Returns (N,) int32:
    T_lo (the bound, as an order-preserving int32 key) or the survivor count of each candidate."""
    if stop_after not in STOP_AFTER:
        raise ValueError(f"stop_after: expected one of {STOP_AFTER}, got {stop_after!r}")
    config, interpret = _prepare(seq_q, offsets, lengths, cand, cand_to_req, k, config, interpret)
    kernel = functools.partial(_stopped_kernel, stop_after=stop_after)
    idx, _ = _launch(kernel, seq_q, offsets, lengths, cand, cand_to_req, k=k, config=config,
                     interpret=interpret, name=f"nn_search_stop{stop_after}")
    return idx[:, 0]


__all__ = ["STOP_AFTER", "nn_search_stopped"]
