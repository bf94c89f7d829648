"""Sequential retrieval models: SASRec and HSTU over item-id sequences, one user vector per position.

Both read a :class:`~transact_jax.retrieval.data.JaggedBatch` (jagged item ids, timestamps,
``offsets``) and return (T, d) user vectors u_i, the representation after the first i + 1 items of
a sequence that predicts item i + 1 (causal: u_i never sees a later item). The score of item j for
u_i is ``u_i . e_j`` with e_j a row of the item embedding table, the same table as the inputs'
(shared input/output embeddings); with ``l2_normalize`` both sides are unit vectors (cosine).

Input tokens are ``e_{x_i} * sqrt(d) + P_i``: the item embedding and a learned absolute position
embedding, positions counted from the first item of the (truncated) sequence, so that appending an
item never changes an earlier token.

* **SASRec** ("Self-Attentive Sequential Recommendation", Kang & McAuley 2018): causal softmax
  self-attention blocks, written here with pre-layer-norm residual sub-layers,
  ``x + Dropout(MHA(LN(x)))`` then ``x + Dropout(FFN(LN(x)))`` (FFN: Linear d->d, ReLU, dropout,
  Linear d->d), and a final layer norm. Run on the padded (B, max_len) view of the batch.
* **HSTU** ("Actions Speak Louder than Words", Section 3):
  :class:`~transact_jax.model.hstu.HSTUEncoder` on the jagged tokens, with a final layer norm.

The paper's Table 4 compares them at the same number of layers, heads and width ("identical
configurations"); its "HSTU-large" has 4x the layers and 2x the heads (:func:`scaled`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels._common import IMPLS
from transact_jax.config_json import AT_LEAST_ONE, Bound, ConfigError, check_fields
from transact_jax.model.hstu import HSTUConfig, HSTUEncoder, dropout, padding_rows

MODELS = ("sasrec", "hstu")


@dataclasses.dataclass(frozen=True)
class RetrievalModelConfig:
    """A sequential retrieval model.

    Attributes:
      model: "sasrec" or "hstu".
      num_items: corpus size V (item ids 1..V, 0 is padding).
      max_len: the longest input sequence (positions 0..max_len-1).
      d_model: embedding and model width d (50 in SASRec's MovieLens setting).
      num_layers, num_heads: blocks and attention heads (SASRec: 2 and 1).
      dropout: dropout rate on the input tokens and inside every block, while training.
      l2_normalize: score with unit-length user vectors and item embeddings (cosine).
      d_qk, d_v: HSTU only, per-head widths of Q, K and of V, U.
      use_rab_pos, use_rab_time: HSTU only, the relative attention biases of the paper's eq. 2.
      normalizer: HSTU only, the pointwise attention's divisor ("seq_len" or "none").
      attention_impl: HSTU only, the attention op's ``impl`` ("auto", "pallas_triton", "xla").
    """

    model: str = "sasrec"
    num_items: int = 1
    max_len: int = 200
    d_model: int = 50
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    l2_normalize: bool = True
    d_qk: int = 32
    d_v: int = 32
    use_rab_pos: bool = True
    use_rab_time: bool = True
    normalizer: str = "seq_len"
    attention_impl: str = "auto"

    def __post_init__(self):
        check_fields(self, {**{n: AT_LEAST_ONE for n in ("num_items", "max_len", "d_model",
                                                        "num_layers", "num_heads", "d_qk", "d_v")},
                            "dropout": Bound(0, 1, high_open=True)})
        if self.model not in MODELS:
            raise ConfigError("model", f"expected one of {MODELS}, got {self.model!r}")
        if self.attention_impl not in IMPLS:
            raise ConfigError("attention_impl", f"expected one of {IMPLS}, got "
                                                f"{self.attention_impl!r}")
        if self.model == "sasrec" and self.d_model % self.num_heads:
            raise ConfigError("num_heads", f"{self.num_heads} does not divide d_model="
                                           f"{self.d_model}")
        if self.model == "hstu":
            self.hstu_config()        # its own checks (normalizer, kernel widths)

    def hstu_config(self) -> HSTUConfig:
        return HSTUConfig(num_layers=self.num_layers, num_heads=self.num_heads, d_model=self.d_model,
                          d_qk=self.d_qk, d_v=self.d_v, dropout=self.dropout,
                          input_dropout=self.dropout, input_scale=False, input_norm=True,
                          final_norm=True, normalizer=self.normalizer, use_rab_pos=self.use_rab_pos,
                          use_rab_time=self.use_rab_time, max_seq_len=self.max_len,
                          attention_impl=self.attention_impl)


def scaled(cfg: RetrievalModelConfig, layers: int = 4, heads: int = 2) -> RetrievalModelConfig:
    """The paper's "-large" variant of ``cfg``: ``layers`` x the layers, ``heads`` x the heads."""
    return dataclasses.replace(cfg, num_layers=cfg.num_layers * layers,
                               num_heads=cfg.num_heads * heads)


# ------------------------------------------------------------------------- jagged <-> padded views


def token_positions(offsets: jax.Array, num_rows: int) -> Tuple[jax.Array, jax.Array]:
    """(T,) sequence index and local position of every row; padding rows get sequence B."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    seq = jnp.searchsorted(offsets.astype(jnp.int32), rows, side="right").astype(jnp.int32) - 1
    seq = jnp.where(rows >= offsets[-1], offsets.shape[0] - 1, seq)
    local = rows - offsets[jnp.clip(seq, 0, offsets.shape[0] - 2)]
    return seq, local


def to_padded(x: jax.Array, offsets: jax.Array, max_len: int) -> Tuple[jax.Array, jax.Array]:
    """Jagged (T, ...) -> padded (B, max_len, ...) and its (B, max_len) validity mask."""
    lengths = jnp.clip(jnp.diff(offsets.astype(jnp.int32)), 0, max_len)
    pos = jnp.arange(max_len, dtype=jnp.int32)
    valid = pos[None, :] < lengths[:, None]
    rows = jnp.clip(offsets[:-1, None] + pos[None, :], 0, x.shape[0] - 1)
    mask = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    return jnp.where(mask, x[rows], 0), valid


def to_jagged(y: jax.Array, offsets: jax.Array, num_rows: int) -> jax.Array:
    """Padded (B, max_len, ...) -> jagged (num_rows, ...); padding rows (and rows past
    ``max_len`` in their sequence) are 0."""
    seq, local = token_positions(offsets, num_rows)
    keep = (seq < offsets.shape[0] - 1) & (local < y.shape[1])
    out = y[jnp.clip(seq, 0, y.shape[0] - 1), jnp.clip(local, 0, y.shape[1] - 1)]
    return jnp.where(keep.reshape(keep.shape + (1,) * (y.ndim - 2)), out, 0)


# ------------------------------------------------------------------------------------------ models


class ItemTokens(nnx.Module):
    """The item embedding table (V + 1, d), row 0 padding, and learned positions (max_len, d)."""

    def __init__(self, cfg: RetrievalModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(1.0 / math.sqrt(cfg.d_model))
        self.d = cfg.d_model
        self.items = nnx.Param(init(rngs.params(), (cfg.num_items + 1, cfg.d_model)))
        self.positions = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(),
                                                                 (cfg.max_len, cfg.d_model)))

    def __call__(self, items: jax.Array, offsets: jax.Array) -> jax.Array:
        """(T,) item ids -> (T, d) tokens ``e * sqrt(d) + P`` (0 on padding rows)."""
        _, local = token_positions(offsets, items.shape[0])
        max_len = self.positions.shape[0]
        tok = (self.items[...][items] * math.sqrt(self.d)
               + self.positions[...][jnp.clip(local, 0, max_len - 1)])
        return jnp.where(padding_rows(offsets, items.shape[0])[:, None], 0.0, tok)


class SASRecBlock(nnx.Module):
    """Causal multi-head softmax self-attention and a point-wise feed-forward, pre-norm residual."""

    def __init__(self, cfg: RetrievalModelConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads, self.rate = cfg.num_heads, cfg.dropout
        self.ln_attn = nnx.LayerNorm(d, epsilon=1e-8, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.ln_ffn = nnx.LayerNorm(d, epsilon=1e-8, rngs=rngs)
        self.ffn1 = nnx.Linear(d, d, rngs=rngs)
        self.ffn2 = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array, keys) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(self.ln_attn(x)).reshape(b, n, 3 * h, d // h), 3, axis=2)
        scores = jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d // h)
        allowed = jnp.tril(jnp.ones((n, n), bool))[None] & valid[:, None, :]     # causal, real keys
        scores = jnp.where(allowed[:, None], scores, -1e30)
        attn = dropout(jax.nn.softmax(scores, axis=-1), self.rate, keys[0])
        a = jnp.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, d)
        x = x + dropout(self.out(a), self.rate, keys[1])
        f = self.ffn2(dropout(jax.nn.relu(self.ffn1(self.ln_ffn(x))), self.rate, keys[2]))
        return x + dropout(f, self.rate, keys[3])


class SASRec(nnx.Module):
    """SASRec on the padded view of a jagged batch (module docstring)."""

    def __init__(self, cfg: RetrievalModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tokens = ItemTokens(cfg, rngs=rngs)
        self.blocks = nnx.List([SASRecBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.LayerNorm(cfg.d_model, epsilon=1e-8, rngs=rngs)

    def __call__(self, items: jax.Array, timestamps: jax.Array, offsets: jax.Array, *,
                 dropout_key: Optional[jax.Array] = None) -> jax.Array:
        del timestamps                    # SASRec has no notion of time
        cfg = self.cfg
        keys = ([None] * (4 * cfg.num_layers + 1) if dropout_key is None
                else list(jax.random.split(dropout_key, 4 * cfg.num_layers + 1)))
        x, valid = to_padded(self.tokens(items, offsets), offsets, cfg.max_len)
        x = dropout(x, cfg.dropout, keys[0])
        for i, block in enumerate(self.blocks):
            x = block(x, valid, keys[1 + 4 * i: 5 + 4 * i])
        return to_jagged(self.final_norm(x), offsets, items.shape[0])


class HSTURetrieval(nnx.Module):
    """Item tokens and an :class:`~transact_jax.model.hstu.HSTUEncoder` (module docstring)."""

    def __init__(self, cfg: RetrievalModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tokens = ItemTokens(cfg, rngs=rngs)
        self.encoder = HSTUEncoder(cfg.hstu_config(), rngs=rngs)

    def __call__(self, items: jax.Array, timestamps: jax.Array, offsets: jax.Array, *,
                 dropout_key: Optional[jax.Array] = None) -> jax.Array:
        return self.encoder(self.tokens(items, offsets), offsets, timestamps=timestamps,
                            dropout_key=dropout_key)


class RetrievalModel(nnx.Module):
    """A sequence model with its scoring: :meth:`user_vectors` (T, d) and :meth:`item_vectors`."""

    def __init__(self, cfg: RetrievalModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.net = (SASRec if cfg.model == "sasrec" else HSTURetrieval)(cfg, rngs=rngs)

    def user_vectors(self, items: jax.Array, timestamps: jax.Array, offsets: jax.Array, *,
                     dropout_key: Optional[jax.Array] = None) -> jax.Array:
        u = self.net(items, timestamps, offsets, dropout_key=dropout_key)
        return _unit(u) if self.cfg.l2_normalize else u

    def item_vectors(self, ids: Optional[jax.Array] = None) -> jax.Array:
        """Output embeddings of ``ids`` (any shape), or of the whole table (V + 1, d)."""
        table = self.net.tokens.items[...]
        e = table if ids is None else table[ids]
        return _unit(e) if self.cfg.l2_normalize else e


def _unit(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


__all__ = ["MODELS", "HSTURetrieval", "RetrievalModel", "RetrievalModelConfig", "SASRec",
           "SASRecBlock", "scaled", "to_jagged", "to_padded", "token_positions"]
