"""VISTA's layers: virtual-seed summarization with quasi-linear attention, the generative
reconstruction loss and target-aware attention ("Massive Memorization with Hundreds of Trillions of
Parameters for Sequential Transducer Generative Recommenders", Sections 3.2-3.3).

Names, once: the user interaction history (UIH) has M tokens u_1..u_M; ``k`` *virtual seeds*
s_1..s_k are learnable embeddings shared by all users, appended after each user's history. Stage 1
(:class:`VistaSummarizer`) runs layers of quasi-linear attention (QLA) over [u, s]: history tokens
attend to each other (all of them, or causally), each seed attends to the whole history and to
itself, never to another seed. The seeds' outputs are the user's *summary* (k x d), which a server
can store per user and reuse (``transact_jax.serving.summary_store``). Stage 2
(:class:`TargetAttention`) lets each candidate attend to its user's k summary embeddings with a
standard softmax transformer block, so its cost does not grow with the history.

A QLA layer (:class:`QlaLayer`) is the QLU token mixer (the ``qla`` op of
:mod:`pallas_kernels.qla.api`: ``O[S] = phi(Q[S]) phi(phi(K[S])^T V[S])``, ``O[T] = phi(Q[T])
phi(...) + Delta(phi(Q[T]), phi(K[T])) V[T]``, phi = SiLU, no row normalisation) followed by the
SGLU channel mixer of TransNormerLLM (``SGLU(x) = (x W_u * x W_v) W_o``, no activation), each
pre-normed with a residual. ``attention="softmax"`` swaps the QLU for softmax attention under the
same mask ("VISTA w/o QLA" of Table 2, :func:`pallas_kernels.qla.reference.
softmax_seed_attention_reference`; dense per sequence, so for comparisons at moderate lengths).

The reconstruction loss (Section 3.2.3, :class:`ReconstructionDecoder`): a causal softmax
transformer block over [s_1..s_k, u_1..u_M] (the summary first) gives v_1..v_M at the history
positions, and ``L = mean_i ||v_i - u_{i+1}||^2 / d`` over i < M (the paper sums over i and the d
features; the means keep the loss's weight independent of the history length and the width). v_i sees only the summary and u_1..u_i, so u_{i+1} does
not leak. The targets u_{i+1} are held constant (stop-gradient): otherwise shrinking every token
embedding would lower the loss without memorizing anything.

Layouts: histories come as dense rows (B, L, d) with a (B, L) mask of valid tokens, which must be a
prefix of each row (left-aligned, chronological); stage 1 packs them jagged (each row's valid tokens,
then the k seeds) so no compute goes to padding in the QLU op.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels._common import IMPLS
from pallas_kernels.qla.api import qla
from pallas_kernels.qla.reference import softmax_seed_attention_reference
from transact_jax.config_json import AT_LEAST_ONE, Bound, ConfigError, check_fields

ATTENTIONS = ("qla", "softmax")


@dataclasses.dataclass(frozen=True)
class VistaConfig:
    """VISTA's shape and options.

    Attributes:
      num_seeds: k, the virtual seeds (the paper: 128).
      d_model: token width d; num_heads: attention heads (per-head width d / num_heads).
      num_layers: stage-1 QLA layers; target_layers: stage-2 transformer blocks.
      ff_mult: SGLU and feed-forward hidden width = ff_mult x d.
      attention: stage 1's token mixer, "qla" or "softmax" (module docstring).
      causal: history tokens attend causally (the paper found no difference and uses full).
      max_seq_len: longest history + k rows the "softmax" variant handles (it is dense).
      recon_weight: weight of the reconstruction loss (the paper: 1.0; 0 turns it off).
      attention_impl: the ``qla`` op's ``impl`` ("auto": the kernel on a GPU).
      eps: layer-norm epsilon.
    """

    num_seeds: int = 128
    d_model: int = 64
    num_heads: int = 2
    num_layers: int = 2
    target_layers: int = 1
    ff_mult: int = 2
    attention: str = "qla"
    causal: bool = False
    max_seq_len: int = 1024
    recon_weight: float = 1.0
    attention_impl: str = "auto"
    eps: float = 1e-6

    def __post_init__(self):
        check_fields(self, {**{n: AT_LEAST_ONE for n in ("num_seeds", "d_model", "num_heads",
                                                        "num_layers", "target_layers", "ff_mult",
                                                        "max_seq_len")},
                            "recon_weight": Bound(0), "eps": Bound(0, low_open=True)})
        if self.attention not in ATTENTIONS:
            raise ConfigError("attention", f"expected one of {ATTENTIONS}, got {self.attention!r}")
        if self.attention_impl not in IMPLS:
            raise ConfigError("attention_impl", f"expected one of {IMPLS}, got {self.attention_impl!r}")
        if self.d_model % self.num_heads:
            raise ConfigError("num_heads", f"must divide d_model={self.d_model}, got {self.num_heads}")


class SGLU(nnx.Module):
    """TransNormerLLM's simple gated linear unit: ``(x W_u * x W_v) W_o``."""

    def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs):
        self.u = nnx.Linear(d, hidden, rngs=rngs)
        self.v = nnx.Linear(d, hidden, rngs=rngs)
        self.o = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.o(self.u(x) * self.v(x))


class QlaLayer(nnx.Module):
    """One stage-1 layer on the jagged layout (module docstring): ``x + O(QLU(LN(x)))``, then
    ``+ SGLU(LN(.))``; padding rows stay zero."""

    def __init__(self, cfg: VistaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.norm1 = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
        self.sglu = SGLU(d, cfg.ff_mult * d, rngs=rngs)

    def __call__(self, x: jax.Array, offsets: jax.Array, num_targets: jax.Array) -> jax.Array:
        cfg = self.cfg
        total, h = x.shape[0], cfg.num_heads
        q, k, v = (t.reshape(total, h, cfg.d_model // h)
                   for t in jnp.split(self.qkv(self.norm1(x)), 3, axis=-1))
        if cfg.attention == "qla":
            a = qla(q, k, v, offsets, num_targets=num_targets, causal=cfg.causal,
                    impl=cfg.attention_impl)
        else:
            a = softmax_seed_attention_reference(q, k, v, offsets, num_targets=num_targets,
                                                 max_seq_len=cfg.max_seq_len, causal=cfg.causal)
        x = x + self.out(a.reshape(total, cfg.d_model))
        x = x + self.sglu(self.norm2(x))
        return jnp.where((jnp.arange(total) < offsets[-1])[:, None], x, 0.0)


def pack_with_seeds(history: jax.Array, mask: jax.Array,
                    seeds: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's valid history tokens (a prefix of the row) then the k seeds, jagged.

    Args: history (B, L, d), mask (B, L) bool (valid tokens first), seeds (k, d).
    Returns: tokens (B (L + k), d) (rows past ``offsets[-1]`` zero), offsets (B + 1,) int32 and the
    seed rows (B, k) int32."""
    b, length, d = history.shape
    k = seeds.shape[0]
    n = jnp.sum(mask, axis=1, dtype=jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(n + k, dtype=jnp.int32)])
    total = b * (length + k)
    pos = jnp.arange(length, dtype=jnp.int32)
    dest = jnp.where(pos[None, :] < n[:, None], offsets[:-1, None] + pos[None, :], total)
    tokens = jnp.zeros((total, d), history.dtype).at[dest.reshape(-1)].set(
        history.reshape(b * length, d), mode="drop")
    seed_rows = offsets[:-1, None] + n[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
    tokens = tokens.at[seed_rows.reshape(-1)].set(jnp.tile(seeds.astype(history.dtype), (b, 1)))
    return tokens, offsets, seed_rows


class VistaSummarizer(nnx.Module):
    """Stage 1: the learnable seeds, ``num_layers`` :class:`QlaLayer` s over [history, seeds], a
    final layer norm; returns each user's summary (B, k, d) (module docstring)."""

    def __init__(self, cfg: VistaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.seeds = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_seeds, cfg.d_model)))
        self.layers = nnx.List([QlaLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.LayerNorm(cfg.d_model, epsilon=cfg.eps, rngs=rngs)

    def __call__(self, history: jax.Array, mask: jax.Array) -> jax.Array:
        tokens, offsets, seed_rows = pack_with_seeds(history, mask, self.seeds[...])
        num_targets = jnp.full((history.shape[0],), self.cfg.num_seeds, jnp.int32)
        for layer in self.layers:
            tokens = layer(tokens, offsets, num_targets)
        return self.norm(tokens[seed_rows])


class _Block(nnx.Module):
    """A pre-norm softmax attention + feed-forward block (``mask``: (B, Q, K) allowed pairs)."""

    def __init__(self, cfg: VistaConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.heads = cfg.num_heads
        self.norm_q = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
        self.norm_kv = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.kv = nnx.Linear(d, 2 * d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.norm_ff = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
        self.ff = SGLU(d, cfg.ff_mult * d, rngs=rngs)

    def __call__(self, x: jax.Array, memory: jax.Array, mask: jax.Array) -> jax.Array:
        b, nq, d = x.shape
        h, w = self.heads, d // self.heads
        q = self.q(self.norm_q(x)).reshape(b, nq, h, w)
        k, v = (t.reshape(b, memory.shape[1], h, w)
                for t in jnp.split(self.kv(self.norm_kv(memory)), 2, axis=-1))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(w)
        s = jnp.where(mask[:, None], s, -1e30)
        p = jnp.where(mask[:, None], jax.nn.softmax(s, axis=-1), 0.0)
        x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, nq, d))
        return x + self.ff(self.norm_ff(x))


class TargetAttention(nnx.Module):
    """Stage 2: candidates (N, d) attend to their user's summary (N, k, d), ``target_layers``
    blocks; returns (N, d). Candidates never see each other."""

    def __init__(self, cfg: VistaConfig, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([_Block(cfg, rngs=rngs) for _ in range(cfg.target_layers)])
        self.norm = nnx.LayerNorm(cfg.d_model, epsilon=cfg.eps, rngs=rngs)

    def __call__(self, candidates: jax.Array, summary: jax.Array) -> jax.Array:
        x = candidates[:, None, :]
        mask = jnp.ones((x.shape[0], 1, summary.shape[1]), bool)
        for block in self.blocks:
            x = block(x, summary, mask)
        return self.norm(x[:, 0])


class ReconstructionDecoder(nnx.Module):
    """The generative reconstruction loss's causal decoder (module docstring)."""

    def __init__(self, cfg: VistaConfig, *, rngs: nnx.Rngs):
        self.block = _Block(cfg, rngs=rngs)
        self.proj = nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs)

    def outputs(self, summary: jax.Array, history: jax.Array) -> jax.Array:
        """v_1..v_L (B, L, d): the causal block over [summary, history] at the history positions."""
        k, length = summary.shape[1], history.shape[1]
        x = jnp.concatenate([summary, history.astype(summary.dtype)], axis=1)
        n = k + length
        causal = jnp.arange(n)[None, :, None] >= jnp.arange(n)[None, None, :]
        return self.proj(self.block(x, x, jnp.broadcast_to(causal, (x.shape[0], n, n)))[:, k:])

    def __call__(self, summary: jax.Array, history: jax.Array, mask: jax.Array) -> jax.Array:
        """``mean ||v_i - sg(u_{i+1})||^2 / d`` over the pairs where both tokens are valid (0 if none)."""
        v = self.outputs(summary, history)
        target = jax.lax.stop_gradient(history[:, 1:].astype(jnp.float32))
        pair = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
        err = jnp.mean((v[:, :-1].astype(jnp.float32) - target) ** 2, axis=-1)
        return jnp.sum(err * pair) / jnp.maximum(jnp.sum(pair), 1.0)
