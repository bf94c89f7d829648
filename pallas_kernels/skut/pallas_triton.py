"""SKUT: the whole TransAct V2 encoder in one Pallas (Triton backend) kernel (paper §3.4.2).

"Single kernel unified transformer": every layer of :func:`pallas_kernels.skut.reference.skut_reference`
(QKV in-projection, causal + key-padding masked softmax attention, out-projection, residual +
LayerNorm, ReLU FFN, residual + LayerNorm; ``torch.nn.TransformerEncoderLayer`` post-LN semantics)
runs inside one ``pallas_call``. The reference is the contract; this module only decides *where*
each value lives. It is the forward pass only: :mod:`pallas_kernels.skut.vjp` makes it
differentiable and :func:`pallas_kernels.skut.api.skut` is the entry point callers use.

Layout of the computation
-------------------------
The grid is ``(B,)``: program ``b`` owns sequence ``b`` from start to end, so the layers of one sequence
can run one after another without leaving the kernel. Within a program, for each layer:

* the query rows are walked in tiles of ``block_q`` rows (``fori_loop``). For a query tile the program
  loads the layer input rows, projects them to Q (``x @ W_q + b_q``) in registers, and
* walks the key tiles ``j`` that the causal mask leaves visible (``fori_loop`` with a data-dependent
  trip count), loading the key rows of the layer input and projecting them to K and V **on the fly**.
  Scores, the online (flash) softmax with running max / denominator, and ``P V`` stay in registers.
  No Q, K, V or score tensor is ever written to HBM; the price is that K/V of key tile ``j`` are
  recomputed once per query tile that sees it (for L = 192 and 64-row tiles: 6 projections instead of
  3 per layer; the projection of a key tile costs the same as one (64 x 64) score tile).
* the attention output of the tile then goes through the out-projection, residual + LayerNorm_1, the
  FFN and residual + LayerNorm_2, all in registers, and is stored once.

Layer outputs: a layer's output row tile is needed by *later* query tiles of the next layer as keys,
so it cannot stay in registers of the tile that produced it (Triton tensors cannot be indexed
dynamically). It is stored to a per-sequence ping-pong buffer (the kernel output itself and one
scratch output of the same shape) and re-read after a CTA barrier. The buffer for one sequence is
``L * d`` elements (24 KiB for L = 192, bf16), written and read by the same SM, so the round trip is
served by the L1/L2 caches rather than DRAM in practice; it is the only intermediate that touches
global memory at all.

Masks: ``mask`` is the key-padding mask (any pattern, not only a prefix; TransAct V2's S_all has
padding between its segments). A query row that sees no key (a padding row at the start of the
sequence) gets a zero attention output, exactly like the reference. Rows ``>= L`` of the last tile are
never stored; every load past ``L`` is masked.

Numerics: matrix products take operands in the input dtype (bf16/f16/f32) and accumulate in float32;
softmax, LayerNorm and residuals are float32, as in the reference. float32 inputs use IEEE float32
products (not TF32), like the reference under ``precision="highest"``. The flash softmax rounds the
*unnormalized* probabilities to the input dtype before ``P V`` (the reference rounds normalized ones),
which moves bf16 results by about one bf16 ulp.

Shared memory (the A10G budget, ``pallas_kernels._common.A10G_SMEM_BYTES`` = 101,376 B per block):
Triton stages the operands of each ``dot`` through shared memory; nothing else is allocated there.
``bench/skut.py`` reports, for every configuration :meth:`SkutConfig.default` can return, the figure
Triton reports for the compiled kernel (sm_90a, on the GPU machine) and for the same Triton IR
compiled for sm_86.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import default_interpret, is_pow2
from pallas_kernels.skut.config import SkutConfig
from pallas_kernels.skut.reference import EncoderWeights

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` with float32 accumulation (IEEE float32 products for float32 operands)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


def _mm_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` with float32 accumulation."""
    return _mm(a, b.T)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * lax.rsqrt(var + eps) * scale[None, :] + bias[None, :]


def _load_rows(ref, start, rows: int, length: int):
    """Rows ``[start, start + rows)`` of a (L, w) ref, zero past row ``length``."""
    start = jnp.asarray(start, jnp.int32)  # a traced start: the last tile may run past L (masked)
    pos = start + jnp.arange(rows)
    return plgpu.load(ref.at[pl.ds(start, rows), :], mask=(pos < length)[:, None], other=0)


def _load_key_ok(mask_ref, start, rows: int, length: int):
    """Key-padding mask of rows ``[start, start + rows)`` as bool, False past ``length``."""
    start = jnp.asarray(start, jnp.int32)
    pos = start + jnp.arange(rows)
    return plgpu.load(mask_ref.at[pl.ds(start, rows)], mask=pos < length, other=0) != 0


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One layer's weights, loaded into registers once per layer (matrices in the compute dtype,
    vectors in float32). ``wq/wk/wv/bq/bk/bv/wo`` are per-head lists."""

    wq: list
    wk: list
    wv: list
    bq: list
    bk: list
    bv: list
    wo: list
    b_o: jax.Array
    ln1_s: jax.Array
    ln1_b: jax.Array
    w_1: jax.Array
    b_1: jax.Array
    w_2: jax.Array
    b_2: jax.Array
    ln2_s: jax.Array
    ln2_b: jax.Array


def _load_layer(refs, layer: int, num_heads: int, cdt) -> _Layer:
    (w_qkv, b_qkv, w_o, b_o, ln1_s, ln1_b, w_1, b_1, w_2, b_2, ln2_s, ln2_b) = refs
    d = w_qkv.shape[1]
    f = w_1.shape[-1]
    dh = d // num_heads

    def vec(ref, start, size):
        return ref[layer, pl.ds(start, size)].astype(jnp.float32)

    def cols(ref, col0, ncols):
        return ref[layer, :, pl.ds(col0, ncols)].astype(cdt)

    heads = range(num_heads)
    return _Layer(
        wq=[cols(w_qkv, h * dh, dh) for h in heads],
        wk=[cols(w_qkv, d + h * dh, dh) for h in heads],
        wv=[cols(w_qkv, 2 * d + h * dh, dh) for h in heads],
        bq=[vec(b_qkv, h * dh, dh) for h in heads],
        bk=[vec(b_qkv, d + h * dh, dh) for h in heads],
        bv=[vec(b_qkv, 2 * d + h * dh, dh) for h in heads],
        wo=[w_o[layer, pl.ds(h * dh, dh), :].astype(cdt) for h in heads],
        b_o=vec(b_o, 0, d), ln1_s=vec(ln1_s, 0, d), ln1_b=vec(ln1_b, 0, d),
        w_1=w_1[layer].astype(cdt), b_1=vec(b_1, 0, f), w_2=w_2[layer].astype(cdt),
        b_2=vec(b_2, 0, d),
        ln2_s=vec(ln2_s, 0, d), ln2_b=vec(ln2_b, 0, d))


def _project(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ w + b`` rounded to the compute dtype (how the reference feeds Q, K, V to attention)."""
    return (_mm(x, w) + b[None, :]).astype(x.dtype)


def _visible(q_pos, k_pos, key_ok, causal: bool):
    visible = key_ok[None, :]
    if causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    return visible


def _softmax_init(rows: int, dh: int):
    return (jnp.zeros((rows, dh), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _softmax_step(state, q, k, v, visible, scale: float):
    """One key tile of the online (flash) softmax: running max ``m``, denominator ``l``, ``P V``.

    Masked scores are -inf; while a row has seen no visible key its max stays -inf and its
    exponent base is 0, so nothing accumulates (no ``inf - inf``)."""
    acc, m_prev, l_prev = state
    s = jnp.where(visible, _mm_t(q, k) * scale, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.where(visible, jnp.exp(s - m_safe[:, None]), 0.0)
    correction = jnp.exp(m_prev - m_safe)
    l_new = l_prev * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _mm(p.astype(q.dtype), v)
    return acc, m_new, l_new


def _softmax_finish(state) -> jax.Array:
    acc, _, denom = state
    return acc / jnp.where(denom > 0, denom, 1.0)[:, None]      # 0 where no key was visible


def _epilogue(x_q, heads, w: _Layer, eps: float) -> jax.Array:
    """Out-projection, residual + LayerNorm_1, ReLU FFN, residual + LayerNorm_2 (float32 out)."""
    cdt = x_q.dtype
    attn = w.b_o[None, :]
    for head, wo in zip(heads, w.wo):
        attn = attn + _mm(head.astype(cdt), wo)
    hid = _layer_norm(x_q.astype(jnp.float32) + attn, w.ln1_s, w.ln1_b, eps)
    ff = jnp.maximum(_mm(hid.astype(cdt), w.w_1) + w.b_1[None, :], 0.0)
    ff = _mm(ff.astype(cdt), w.w_2) + w.b_2[None, :]
    return _layer_norm(hid + ff, w.ln2_s, w.ln2_b, eps)


def _skut_kernel(x_ref, mask_ref, *refs, num_layers: int, num_heads: int, causal: bool, eps: float,
                 block_q: int, block_k: int, length: int, resident: bool, barrier: bool):
    weight_refs, (out_ref, *scratch_refs) = refs[:12], refs[12:]
    d = x_ref.shape[-1]
    scale = 1.0 / math.sqrt(d // num_heads)
    if resident:
        _resident_body(x_ref, mask_ref, weight_refs, out_ref, num_layers=num_layers,
                       num_heads=num_heads, causal=causal, eps=eps, block=block_q, length=length,
                       scale=scale)
    else:
        _streaming_body(x_ref, mask_ref, weight_refs, out_ref, scratch_refs, num_layers=num_layers,
                        num_heads=num_heads, causal=causal, eps=eps, block_q=block_q,
                        block_k=block_k, length=length, scale=scale, barrier=barrier)


def _resident_body(x_ref, mask_ref, weight_refs, out_ref, *, num_layers, num_heads, causal, eps,
                   block, length, scale):
    """Whole sequence on chip: tiles are Python lists of register tensors (the loops unroll), so
    every layer's output feeds the next layer without leaving the SM, and K / V of each tile are
    projected once per layer."""
    num_tiles = pl.cdiv(length, block)
    pos = [t * block + jnp.arange(block) for t in range(num_tiles)]
    tiles = [_load_rows(x_ref, t * block, block, length) for t in range(num_tiles)]
    key_ok = [_load_key_ok(mask_ref, t * block, block, length) for t in range(num_tiles)]
    for layer in range(num_layers):
        w = _load_layer(weight_refs, layer, num_heads, x_ref.dtype)
        heads_out = [[] for _ in range(num_tiles)]
        for h in range(num_heads):
            qs = [_project(x, w.wq[h], w.bq[h]) for x in tiles]
            ks = [_project(x, w.wk[h], w.bk[h]) for x in tiles]
            vs = [_project(x, w.wv[h], w.bv[h]) for x in tiles]
            for i in range(num_tiles):
                state = _softmax_init(block, qs[i].shape[-1])
                for j in range(i + 1 if causal else num_tiles):
                    vis = _visible(pos[i], pos[j], key_ok[j], causal and j == i)
                    state = _softmax_step(state, qs[i], ks[j], vs[j], vis, scale)
                heads_out[i].append(_softmax_finish(state))
        tiles = [_epilogue(x, heads_out[i], w, eps).astype(x_ref.dtype) for i, x in enumerate(tiles)]
    for t, y in enumerate(tiles):
        plgpu.store(out_ref.at[pl.ds(jnp.asarray(t * block, jnp.int32), block), :], y,
                    mask=(pos[t] < length)[:, None])


def _streaming_body(x_ref, mask_ref, weight_refs, out_ref, scratch_refs, *, num_layers, num_heads,
                    causal, eps, block_q, block_k, length, scale, barrier):
    """Any length: query tiles in a loop, K / V of each visible key tile projected on the fly, layer
    outputs through the per-sequence ping-pong buffer (see the module docstring)."""
    num_q_tiles = pl.cdiv(length, block_q)
    num_k_tiles = pl.cdiv(length, block_k)
    # Layer l reads reads[l] and writes writes[l]; the last layer writes the output.
    writes = [out_ref if (num_layers - 1 - l) % 2 == 0 else scratch_refs[0] for l in range(num_layers)]
    reads = [x_ref] + writes[:-1]
    for layer in range(num_layers):
        src, dst = reads[layer], writes[layer]
        w = _load_layer(weight_refs, layer, num_heads, x_ref.dtype)

        def query_tile(i, carry, src=src, dst=dst, w=w):
            q0 = i * block_q
            q_pos = q0 + jnp.arange(block_q)
            x_q = _load_rows(src, q0, block_q, length)
            if causal:
                k_tiles = jnp.minimum(lax.div(q0 + block_q + block_k - 1, block_k), num_k_tiles)
            else:
                k_tiles = num_k_tiles
            heads = []
            for h in range(num_heads):
                q = _project(x_q, w.wq[h], w.bq[h])

                def key_tile(j, state, q=q, h=h):
                    k0 = j * block_k
                    x_k = _load_rows(src, k0, block_k, length)
                    vis = _visible(q_pos, k0 + jnp.arange(block_k),
                                   _load_key_ok(mask_ref, k0, block_k, length), causal)
                    return _softmax_step(state, q, _project(x_k, w.wk[h], w.bk[h]),
                                         _project(x_k, w.wv[h], w.bv[h]), vis, scale)

                state = lax.fori_loop(0, k_tiles, key_tile, _softmax_init(block_q, q.shape[-1]))
                heads.append(_softmax_finish(state))
            y = _epilogue(x_q, heads, w, eps)
            plgpu.store(dst.at[pl.ds(q0, block_q), :], y.astype(dst.dtype),
                        mask=(q_pos < length)[:, None])
            return carry

        lax.fori_loop(0, num_q_tiles, query_tile, 0)
        if barrier and layer + 1 < num_layers:
            plgpu.debug_barrier()   # this layer's rows, stored by all warps, are the next layer's keys


def _validate(x: jax.Array, mask: jax.Array, weights: EncoderWeights, num_heads: int) -> None:
    if x.ndim != 3:
        raise ValueError(f"x: expected (B, L, d), got shape {x.shape}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask: expected shape {x.shape[:2]} (B, L), got {mask.shape}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f"mask: expected bool or integer dtype, got {mask.dtype}")
    d, f = weights.d_model, weights.ff_dim
    if x.shape[-1] != d:
        raise ValueError(f"x: width {x.shape[-1]} does not match d_model={d} of the weights")
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"num_heads: {num_heads} does not divide d_model={d}")
    dh = d // num_heads
    for name, value in (("d_model", d), ("dim_feedforward", f), ("head dim d_model/num_heads", dh)):
        if not is_pow2(value) or value < 16:
            raise ValueError(f"weights: SKUT needs {name} to be a power of two >= 16 (Triton tile "
                             f"sizes), got {value}; use impl='xla' for other widths")
    if x.shape[1] < 1:
        raise ValueError("x: sequence length must be >= 1")


def skut_pallas_triton(x: jax.Array, mask: jax.Array, weights: EncoderWeights, *,
                       num_heads: int = 1, causal: bool = True, eps: float = 1e-5,
                       config: Optional[SkutConfig] = None,
                       interpret: Optional[bool] = None) -> jax.Array:
    """All encoder layers on ``x`` (B, L, d) with key-padding ``mask`` (B, L) in one kernel.

    Same contract as :func:`~pallas_kernels.skut.reference.skut_reference` at inference (no
    dropout): returns (B, L, d) in ``x.dtype``. ``x`` is float32, bfloat16 or float16; ``mask`` bool
    or integer (nonzero: a valid token); d_model, dim_feedforward and the head width must be powers
    of two >= 16 (Triton tile sizes). ``config`` defaults to :meth:`SkutConfig.default` for the
    shape; ``interpret`` defaults to True when no GPU backend is present (Pallas interpret mode,
    for CPU tests). Forward only (not differentiable): see :mod:`pallas_kernels.skut.vjp`. Inputs
    are validated here; errors name the argument.
    """
    _validate(x, mask, weights, num_heads)
    batch, length, d = x.shape
    config = config or SkutConfig.default(length, d, x.dtype)
    config.check(length, x.dtype)
    interpret = default_interpret() if interpret is None else interpret
    cdt = x.dtype
    mask_i = mask if mask.dtype in (jnp.int8, jnp.int32) else mask.astype(jnp.int8)
    # Weights go in as they are (the kernel casts matrices to the compute dtype in registers), so
    # the jitted call is the kernel plus at most a dtype conversion of the mask. Order: _load_layer.
    params = (weights.w_qkv, weights.b_qkv, weights.w_o, weights.b_o, weights.ln1_scale,
              weights.ln1_bias, weights.w_1, weights.b_1, weights.w_2, weights.b_2,
              weights.ln2_scale, weights.ln2_bias)
    num_layers = weights.num_layers

    def whole(a):
        return pl.BlockSpec(a.shape, lambda b, nd=a.ndim: (0,) * nd)

    seq_spec = pl.BlockSpec((None, length, d), lambda b: (b, 0, 0))
    out_shape = [jax.ShapeDtypeStruct(x.shape, cdt)]
    if num_layers > 1 and not config.resident:
        out_shape.append(jax.ShapeDtypeStruct(x.shape, cdt))   # ping-pong buffer of layer outputs
    kernel = functools.partial(
        _skut_kernel, num_layers=num_layers, num_heads=num_heads, causal=causal, eps=eps,
        block_q=config.block_q, block_k=config.block_k, length=length, resident=config.resident,
        barrier=not interpret)  # interpret mode runs a program's ops in order: no barrier to lower
    outs = pl.pallas_call(
        kernel,
        grid=(batch,),
        in_specs=[seq_spec, pl.BlockSpec((None, length), lambda b: (b, 0))]
        + [whole(p) for p in params],
        out_specs=[seq_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="skut",
    )(x, mask_i, *params)
    return outs[0]


__all__ = ["skut_pallas_triton"]
