"""Frozen model configuration.

One code path covers TransAct V2 and the baselines of the paper's Table 2; they differ only in
``sequence_model`` (a name in the registry of :mod:`transact_jax.model.sequence`) and ``segments``:

* ``sequence_model="none"``: no user sequence (Wide&Deep).
* ``"bst"``: BST - a non-causal transformer over the chosen segments with the candidate appended as an
  extra token; the candidate token's output is the sequence vector.
* ``"transact"``: TransAct - early fusion (the candidate embedding is concatenated to every token,
  eq. 4), causal transformer, linear + max-pool over valid positions.
* ``"hstu"``: HSTU ("Actions Speak Louder than Words", Section 3) - the valid tokens packed as a
  jagged sequence with the candidate appended as one target token, a causal HSTU encoder; the
  target's output is the sequence vector (:mod:`transact_jax.model.sequence.hstu`).
* ``"vista"``: VISTA - the valid tokens summarised into ``num_seeds`` virtual-seed embeddings by
  quasi-linear attention, the candidate attending to that summary (:mod:`transact_jax.model.vista`,
  :mod:`transact_jax.model.sequence.vista`).

``segments`` picks S_all segments (``SelectionConfig.segments``): TransAct (RT) and BST read
``("rt_recent", "rt_nn")``; TransAct V2 reads all four, ``("ll", "rt_recent", "rt_nn", "imp")``.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

from pallas_kernels._common import IMPLS
from transact_jax.config_json import AT_LEAST_ONE, NON_NEGATIVE, Bound, ConfigError, check_fields

ALL_SEGMENTS = ("ll", "rt_recent", "rt_nn", "imp")
TOKEN_FEATURES = ("similarity", "age")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the ranking model.

    Attributes:
      sequence_model: a registered sequence model: "none" | "bst" | "transact" | "hstu" | "vista"
        (module docstring).
      segments: S_all segments the sequence model reads, in S_all order.
      d_model: transformer width d = 2 x embedding_dim (64, eq. 4). "hstu" takes any width (no
        early fusion).
      num_layers, num_heads, ff_dim: encoder shape (2 layers, 1 head, feed-forward 32; paper §3.2.2).
        "hstu" has no feed-forward block (ff_dim unused); its per-head width is d_model / num_heads.
      dropout: encoder dropout during training (torch's four sites); 0 at inference.
      seq_out_dim: width of the linear layer before max-pooling.
      cat_embed_dim: embedding width of each categorical feature.
      num_cross_layers: DCN-v2 cross layers.
      mlp_dims: hidden sizes of the MLP after the cross layers.
      wide: add a per-category linear ("wide") logit per head.
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      encoder_impl: the ``impl`` of :func:`pallas_kernels.skut.api.skut`: "xla" (the jnp reference
        compiled by XLA), "pallas_triton" (the fused SKUT kernel; Pallas interpret mode off GPU) or
        "auto" (the kernel on a GPU, XLA elsewhere). SKUT has no dropout: a training step that
        applies dropout (``dropout > 0``) runs the reference; inference and dropout-free training
        run the kernel (its backward pass is the reference's autodiff). For "hstu" it is the
        ``impl`` of the HSTU attention op (:func:`pallas_kernels.hstu_attention.api.hstu_attention`,
        which has forward and backward kernels and applies no dropout itself); "pallas_triton" needs
        d_model / num_heads a power of two >= 16, and "auto" runs XLA when it is not.
      b_m: HSTU only: the M-FALCON micro-batch size ("Actions Speak Louder than Words" Section
        3.4), the most candidates one encoder pass scores as targets after a shared history. The
        attention is sized for it (``max_seq_len`` = S_all slots + b_m; the "seq_len" normalizer
        divides by that, so b_m is fixed when the model is trained). 1 (the default) scores one
        candidate per sequence; serving uses M-FALCON when b_m > 1 and the history the model reads
        does not depend on the candidate (:func:`transact_jax.model.sequence.hstu.shared_history`).
      token_features: extra per-token features added to every token (empty by default, the paper's
        tokens): ``"similarity"``, the bucketed cosine similarity of the token to the candidate (the
        score NN selection ranks by), and ``"age"``, the bucketed time between the token and the
        request (the paper's tokens carry a timestamp; ``transact_jax.model.layers`` has the
        buckets). "hstu" adds them to its history tokens as the other families do. ``"age"``
        needs token timestamps, which training and evaluation inputs carry and the serving engine
        does not ship (it refuses such a model).
      num_seeds: VISTA only: the k virtual seeds (the summary's length; the paper: 128).
      recon_weight: VISTA only: weight of the generative reconstruction loss (the paper: 1.0; 0
        turns it off).
      summary_attention: VISTA only: stage 1's token mixer, "qla" (quasi-linear attention, its
        ``impl`` is ``encoder_impl``) or "softmax" ("VISTA w/o QLA").
      causal_summary: VISTA only: history tokens attend causally in stage 1 (default: all of them).
    """

    sequence_model: str = "transact"
    segments: Tuple[str, ...] = ALL_SEGMENTS
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 1
    ff_dim: int = 32
    dropout: float = 0.0
    seq_out_dim: int = 64
    cat_embed_dim: int = 16
    num_cross_layers: int = 2
    mlp_dims: Tuple[int, ...] = (256, 128)
    wide: bool = True
    dtype: str = "float32"
    encoder_impl: str = "xla"
    token_features: Tuple[str, ...] = ()
    b_m: int = 1
    num_seeds: int = 128
    recon_weight: float = 1.0
    summary_attention: str = "qla"
    causal_summary: bool = False

    def __post_init__(self):
        check_fields(self, {**{name: AT_LEAST_ONE for name in (
            "d_model", "num_layers", "num_heads", "ff_dim", "seq_out_dim", "cat_embed_dim", "mlp_dims",
            "b_m", "num_seeds")},
            "num_cross_layers": NON_NEGATIVE, "dropout": Bound(0, 1, high_open=True),
            "recon_weight": NON_NEGATIVE})
        if self.summary_attention not in ("qla", "softmax"):
            raise ConfigError("summary_attention", f"expected 'qla' or 'softmax', got "
                                                   f"{self.summary_attention!r}")
        from transact_jax.model.sequence import names  # the registry imports this module
        if self.sequence_model not in names():
            raise ConfigError("sequence_model", f"expected one of {names()}, got {self.sequence_model!r}")
        if self.encoder_impl not in IMPLS:
            raise ConfigError("encoder_impl", f"expected one of {IMPLS}, got {self.encoder_impl!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", f"expected 'float32' or 'bfloat16', got {self.dtype!r}")
        unknown = set(self.segments) - set(ALL_SEGMENTS)
        if unknown:
            raise ConfigError("segments", f"unknown segments {sorted(unknown)}")
        if list(self.segments) != [s for s in ALL_SEGMENTS if s in self.segments]:
            raise ConfigError("segments", f"must follow S_all order {ALL_SEGMENTS}")
        if self.sequence_model != "none" and not self.segments:
            raise ConfigError("segments", "a sequence model needs at least one segment")
        if self.d_model % self.num_heads:
            raise ConfigError("num_heads", f"{self.num_heads} does not divide d_model={self.d_model}")
        bad = [f for f in self.token_features if f not in TOKEN_FEATURES]
        if bad or len(set(self.token_features)) != len(self.token_features):
            raise ConfigError("token_features", f"expected distinct names from {TOKEN_FEATURES}, got "
                                                f"{self.token_features!r}")
        if self.sequence_model == "hstu":
            from transact_jax.model.sequence.hstu import check_model_config
            check_model_config(self)

    @property
    def uses_sequence(self) -> bool:
        return self.sequence_model != "none"
