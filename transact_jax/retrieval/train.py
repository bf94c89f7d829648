"""Training and evaluation of the sequential retrieval models in the traditional setting of
"Generative Recommenders" (§4.1.1): full shuffle, multi-epoch, next-item prediction, metrics over
the entire corpus.

**Objective.** Sampled softmax over next items: at every position i with a target x_{i+1}, the logit
of the target competes with ``num_negatives`` sampled items, logits ``u_i . e_j / temperature``.
Each sequence of a batch draws its own negatives (with replacement), shared by its positions; a
negative equal to the position's target is masked out. ``negatives="uniform"`` draws from all V
items; ``"popularity"`` draws item j with probability q_j proportional to (its training count + 1)
raised to ``popularity_power`` (the + 1 keeps every item drawable: an item never drawn would never
be pushed down and would end up above every target), and subtracts ``log(V q_j)`` from each
negative's logit (the logQ correction), so both estimate the same full-softmax objective. The
optimizer is Adam (AdamW when ``weight_decay > 0``); the training sequences are reshuffled every
epoch.

**Evaluation.** For every evaluated user, the user vector after the last input item scores every
item 1..V (padding excluded); the target's rank is the number of other items scoring at least as
high (ties count against the target). Items the user has already seen are **not** excluded by
default, the paper's protocol of ranking against the entire corpus (MovieLens has one rating per
user and item, so a seen item is never the target there); ``exclude_seen=True`` removes the items of
the model's input sequence (the last ``max_len``) instead. HR@K is the fraction of users with rank
< K, NDCG@K the mean over users of ``1 / log2(rank + 2)`` if rank < K, else 0 (K in ``ks``).

**Stochastic Length** ("Actions Speak Louder than Words" §3.2, eq. (4)): with
``stochastic_length_alpha < 2`` every epoch trains on a fresh draw of
:func:`~transact_jax.retrieval.data.subsample_training` (its seed derived from the run's seed and
the epoch), N_c being the data's ``max_len`` (the truncation length of the histories); validation
and test inputs are never subsampled. Batches keep the full training set's token capacity, so the
jitted step compiles once.

**Early stopping** on validation NDCG@10, evaluated every ``eval_every`` epochs: training stops after
``patience`` evaluations without improvement (or at ``max_epochs``); the best parameters are kept and
scored on validation and test.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from transact_jax.config_json import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, check_fields
from transact_jax.data.stochastic_length import StochasticLengthConfig
from transact_jax.model.builder import ModelDef, Params, module_def
from transact_jax.retrieval.data import (
    JaggedBatch,
    LeaveOneOut,
    SequenceSet,
    batches,
    subsample_training,
    token_capacity,
)
from transact_jax.retrieval.models import (
    RetrievalModel,
    RetrievalModelConfig,
    to_padded,
    token_positions,
)

NEGATIVE_SAMPLERS = ("uniform", "popularity")


@dataclasses.dataclass(frozen=True)
class RetrievalTrainConfig:
    """Training and evaluation of a retrieval model (module docstring).

    Attributes:
      batch_size: training sequences per step.
      learning_rate, weight_decay: Adam(W) (beta2 0.98).
      max_epochs: passes over the training sequences at most.
      num_negatives: sampled negatives per sequence and step (128 for MovieLens in the paper).
      negatives: "uniform" or "popularity" (with the logQ correction).
      popularity_power: exponent of (training count + 1) for "popularity".
      temperature: the logits' divisor (small with ``l2_normalize`` models, whose scores are cosines).
      eval_every: epochs between validation evaluations.
      patience: evaluations without a better validation NDCG@10 before stopping.
      eval_batch_size: users per evaluation step.
      exclude_seen: drop the input sequence's items from the ranking (default: rank against all).
      ks: cut-offs of HR@K and NDCG@K (10 must be one: early stopping reads NDCG@10).
      stochastic_length_alpha: alpha of Stochastic Length on the training sequences, in (1, 2];
        2 (the default) turns it off.
      stochastic_length_method: its subsequence selection ("feature_weighted", "greedy",
        "random").
    """

    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 100
    num_negatives: int = 128
    negatives: str = "uniform"
    popularity_power: float = 1.0
    temperature: float = 0.05
    eval_every: int = 1
    patience: int = 10
    eval_batch_size: int = 256
    exclude_seen: bool = False
    ks: Tuple[int, ...] = (10, 50, 200)
    stochastic_length_alpha: float = 2.0
    stochastic_length_method: str = "feature_weighted"

    def __post_init__(self):
        check_fields(self, {**{n: AT_LEAST_ONE for n in ("batch_size", "max_epochs", "num_negatives",
                                                        "eval_every", "patience", "eval_batch_size",
                                                        "ks")},
                            "learning_rate": POSITIVE, "temperature": POSITIVE,
                            "weight_decay": NON_NEGATIVE, "popularity_power": NON_NEGATIVE})
        if self.negatives not in NEGATIVE_SAMPLERS:
            raise ConfigError("negatives", f"expected one of {NEGATIVE_SAMPLERS}, got "
                                           f"{self.negatives!r}")
        if 10 not in self.ks:
            raise ConfigError("ks", f"must hold 10 (early stopping reads NDCG@10), got {self.ks}")
        self.stochastic_length(1)                 # checks alpha and method (N_c comes with data)

    def stochastic_length(self, max_len: int) -> Optional[StochasticLengthConfig]:
        """The Stochastic Length of training histories truncated to ``max_len`` (N_c), None when
        off (alpha 2)."""
        try:
            cfg = StochasticLengthConfig(max_len, self.stochastic_length_alpha,
                                         self.stochastic_length_method)
        except ConfigError as e:
            field = e.field if e.field == "max_len" else f"stochastic_length_{e.field}"
            raise ConfigError(field, e.problem) from e
        return cfg if cfg.enabled else None


# ----------------------------------------------------------------------------------------- metrics


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """HR@K: the fraction of 0-based ``ranks`` below ``k``."""
    return float(np.mean(np.asarray(ranks) < k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@K with one relevant item: mean of ``1 / log2(rank + 2)`` for ranks below ``k``, else 0."""
    r = np.asarray(ranks, np.float64)
    return float(np.mean(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)))


def ranking_metrics(ranks: np.ndarray, ks=(10, 50, 200)) -> Dict[str, float]:
    """``hr@K`` and ``ndcg@K`` for every K, and the number of ``users``."""
    out: Dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    out["users"] = int(len(ranks))
    return out


def target_ranks(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """(B,) 0-based rank of ``targets`` (B,) in ``scores`` (B, V + 1) over items 1..V: the number
    of other items scoring at least as high (column 0, padding, never counts)."""
    scores = scores.at[:, 0].set(-jnp.inf)
    t = jnp.take_along_axis(scores, targets[:, None], axis=1)
    return jnp.sum(scores >= t, axis=1).astype(jnp.int32) - 1


def popularity_baseline(data: LeaveOneOut, ks=(10, 50, 200)) -> Dict[str, Dict[str, float]]:
    """HR@K / NDCG@K on validation and test of ranking every user's items by training counts (ties
    against the target, as for the models): the bar a sequential model has to clear."""
    counts = data.train_counts.astype(np.float64)
    out = {}
    for name, split in (("valid", data.valid), ("test", data.test)):
        target = split.targets[split.offsets[1:] - 1]
        ranks = np.sum(counts[None, 1:] >= counts[target][:, None], axis=1) - 1
        out[name] = ranking_metrics(ranks, ks)
    return out


# ------------------------------------------------------------------------------- model as functions


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """A model's static definition: ``bind(params)`` rebuilds it (inside jit), ``init(seed)``."""

    cfg: RetrievalModelConfig
    definition: ModelDef

    def bind(self, params: Params) -> RetrievalModel:
        return self.definition.bind(params)

    def init(self, seed: int) -> Params:
        return _initializer(self.cfg)(jax.random.key(seed))


@functools.lru_cache(maxsize=16)
def model_fns(cfg: RetrievalModelConfig) -> ModelFns:
    return ModelFns(cfg, module_def(lambda: RetrievalModel(cfg, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=16)
def _initializer(cfg: RetrievalModelConfig) -> Callable:
    return jax.jit(lambda key: nnx.to_pure_dict(nnx.state(RetrievalModel(cfg, rngs=nnx.Rngs(key)))))


def num_parameters(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------------------- objective


def sample_negatives(key: jax.Array, shape: Tuple[int, ...], num_items: int,
                     cdf: Optional[jax.Array]) -> jax.Array:
    """Item ids in 1..V: uniform (``cdf`` None) or by the popularity ``cdf`` (V,) (inverse CDF)."""
    if cdf is None:
        return jax.random.randint(key, shape, 1, num_items + 1, dtype=jnp.int32)
    u = jax.random.uniform(key, shape) * cdf[-1]
    return jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, num_items - 1).astype(jnp.int32) + 1


def popularity_tables(counts: np.ndarray, power: float = 1.0) -> Tuple[jax.Array, jax.Array]:
    """The popularity sampler of training ``counts`` (V + 1,) (index 0 padding): ``log_q`` (V + 1,)
    = log(V q_j), the logQ correction (0 for padding), and ``cdf`` (V,) of q over items 1..V, with
    q_j proportional to ``(counts[j] + 1) ** power``."""
    weights = (np.asarray(counts[1:], np.float64) + 1.0) ** power
    q = weights / weights.sum()
    log_q = np.concatenate([[0.0], np.log(q * len(q))])
    return jnp.asarray(log_q, jnp.float32), jnp.asarray(np.cumsum(q), jnp.float32)


def sampled_softmax_loss(model: RetrievalModel, batch: JaggedBatch, key: jax.Array,
                         tcfg: RetrievalTrainConfig, log_q: Optional[jax.Array],
                         cdf: Optional[jax.Array], train: bool = True) -> jax.Array:
    """Mean sampled-softmax loss over the batch's positions with a target (module docstring)."""
    cfg = model.cfg
    dkey, nkey = jax.random.split(key)
    u = model.user_vectors(batch.items, batch.timestamps, batch.offsets,
                           dropout_key=dkey if train and cfg.dropout > 0 else None)
    u_pad, valid = to_padded(u, batch.offsets, cfg.max_len)                       # (B, L, d)
    y_pad, _ = to_padded(batch.targets, batch.offsets, cfg.max_len)              # (B, L)
    b = batch.offsets.shape[0] - 1
    neg = sample_negatives(nkey, (b, tcfg.num_negatives), cfg.num_items, cdf)     # (B, N)
    pos_logit = jnp.sum(u_pad * model.item_vectors(y_pad), -1) / tcfg.temperature   # (B, L)
    neg_logit = jnp.einsum("bld,bnd->bln", u_pad, model.item_vectors(neg)) / tcfg.temperature
    if log_q is not None:
        neg_logit = neg_logit - log_q[neg][:, None, :]
    neg_logit = jnp.where(neg[:, None, :] == y_pad[:, :, None], -1e9, neg_logit)   # hits
    lse = jnp.logaddexp(pos_logit, jax.nn.logsumexp(neg_logit, axis=-1))
    has_target = valid & (y_pad > 0)
    return jnp.sum(jnp.where(has_target, lse - pos_logit, 0.0)) / jnp.maximum(has_target.sum(), 1)


# ---------------------------------------------------------------------------------------- training


def _to_device(batch: JaggedBatch) -> JaggedBatch:
    return JaggedBatch(*(jnp.asarray(getattr(batch, f.name)) for f in dataclasses.fields(batch)))


@functools.lru_cache(maxsize=16)
def make_train_step(cfg: RetrievalModelConfig, tcfg: RetrievalTrainConfig) -> Callable:
    """``step(params, opt_state, batch, key, log_q, cdf) -> (params, opt_state, loss)``, jitted
    (one per configuration: every seed reuses its compilation). ``log_q`` (V + 1,) and ``cdf`` (V,)
    are the popularity sampler's tables, None for uniform negatives."""
    fns, opt = model_fns(cfg), optimizer(tcfg)

    def loss_fn(params, batch, key, log_q, cdf):
        return sampled_softmax_loss(fns.bind(params), batch, key, tcfg, log_q, cdf)

    @jax.jit
    def step(params, opt_state, batch, key, log_q, cdf):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key, log_q, cdf)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def optimizer(tcfg: RetrievalTrainConfig) -> optax.GradientTransformation:
    """Adam (beta2 0.98), decoupled weight decay when ``weight_decay > 0``."""
    return optax.adamw(tcfg.learning_rate, b1=0.9, b2=0.98, weight_decay=tcfg.weight_decay)


@functools.lru_cache(maxsize=16)
def make_rank_fn(cfg: RetrievalModelConfig, exclude_seen: bool = False) -> Callable:
    """``ranks(params, batch) -> (B,)`` rank of each sequence's last target (-1 for an empty
    sequence), jitted."""
    fns = model_fns(cfg)

    @jax.jit
    def ranks(params, batch: JaggedBatch):
        model = fns.bind(params)
        u = model.user_vectors(batch.items, batch.timestamps, batch.offsets)
        lengths = jnp.diff(batch.offsets)
        last = jnp.maximum(batch.offsets[1:] - 1, 0)
        scores = u[last] @ model.item_vectors().T                                   # (B, V + 1)
        target = batch.targets[last]
        if exclude_seen:
            seq, _ = token_positions(batch.offsets, batch.items.shape[0])
            keep = jnp.take_along_axis(scores, target[:, None], axis=1)
            scores = scores.at[seq, batch.items].set(-jnp.inf, mode="drop")
            scores = jnp.put_along_axis(scores, target[:, None], keep, axis=1, inplace=False)
        return jnp.where(lengths > 0, target_ranks(scores, target), -1)

    return ranks


def evaluate(rank_fn: Callable, params: Params, data: SequenceSet, batch_size: int,
             capacity: Optional[int] = None, ks=(10, 50, 200)) -> Dict[str, float]:
    """HR@K / NDCG@K of the last target of every sequence of ``data``."""
    out = [np.asarray(rank_fn(params, _to_device(b)))
           for b in batches(data, batch_size, capacity=capacity)]
    ranks = np.concatenate(out) if out else np.zeros(0, np.int32)
    return ranking_metrics(ranks[ranks >= 0], ks)


def epoch_training_set(data: SequenceSet, sl: Optional[StochasticLengthConfig], seed: int,
                       epoch: int) -> SequenceSet:
    """The training sequences of ``epoch``: ``data`` itself, or (``sl`` given) its Stochastic
    Length draw seeded by (``seed``, ``epoch``)."""
    if sl is None:
        return data
    return subsample_training(data, sl, np.random.default_rng([seed, epoch]))


def fit(cfg: RetrievalModelConfig, tcfg: RetrievalTrainConfig, data: LeaveOneOut, seed: int = 0,
        log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train ``cfg`` on ``data.train`` (module docstring); returns the validation and test metrics
    of the best epoch, the learning curve and the cost."""
    if cfg.num_items != data.num_items or cfg.max_len != data.max_len:
        raise ConfigError("num_items" if cfg.num_items != data.num_items else "max_len",
                          f"the model has {cfg.num_items} items / max_len {cfg.max_len}, the data "
                          f"{data.num_items} / {data.max_len}")
    if data.train.num_sequences == 0:
        raise ValueError("data: no training sequences")
    t0 = time.perf_counter()
    fns = model_fns(cfg)
    params = fns.init(seed)
    opt_state = optimizer(tcfg).init(params)
    log_q = cdf = None
    if tcfg.negatives == "popularity":
        log_q, cdf = popularity_tables(data.train_counts, tcfg.popularity_power)
    sl = tcfg.stochastic_length(data.max_len)
    step = make_train_step(cfg, tcfg)
    rank_fn = make_rank_fn(cfg, tcfg.exclude_seen)
    train_cap = token_capacity(data.train, tcfg.batch_size)
    eval_cap = max(token_capacity(data.valid, tcfg.eval_batch_size),
                   token_capacity(data.test, tcfg.eval_batch_size))
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)
    curve = {"epoch": [], "train_loss": [], "valid_ndcg@10": []}
    best = {"ndcg": -1.0, "epoch": 0, "params": params}
    since_best, steps, epoch = 0, 0, 0
    for epoch in range(1, tcfg.max_epochs + 1):
        losses = []
        train = epoch_training_set(data.train, sl, seed, epoch)
        for batch in batches(train, tcfg.batch_size, rng.permutation(train.num_sequences),
                             train_cap):
            params, opt_state, loss = step(params, opt_state, _to_device(batch),
                                           jax.random.fold_in(key, steps), log_q, cdf)
            losses.append(loss)
            steps += 1
        train_loss = float(np.mean(jax.device_get(losses)))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss})")
        if epoch % tcfg.eval_every and epoch != tcfg.max_epochs:
            continue
        valid = evaluate(rank_fn, params, data.valid, tcfg.eval_batch_size, eval_cap, (10,))
        curve["epoch"].append(epoch)
        curve["train_loss"].append(train_loss)
        curve["valid_ndcg@10"].append(valid["ndcg@10"])
        if log:
            log(f"{cfg.model} L{cfg.num_layers} H{cfg.num_heads} seed {seed} epoch {epoch}: loss "
                f"{train_loss:.4f} valid NDCG@10 {valid['ndcg@10']:.4f} HR@10 {valid['hr@10']:.4f}")
        if valid["ndcg@10"] > best["ndcg"]:
            best = {"ndcg": valid["ndcg@10"], "epoch": epoch, "params": params}
            since_best = 0
        else:
            since_best += 1
            if since_best >= tcfg.patience:
                break
    train_seconds = time.perf_counter() - t0
    params = best["params"]
    return {"seed": seed, "model": cfg.model, "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads, "parameters": num_parameters(params),
            "best_epoch": best["epoch"], "epochs": epoch, "steps": steps,
            "valid": evaluate(rank_fn, params, data.valid, tcfg.eval_batch_size, eval_cap, tcfg.ks),
            "test": evaluate(rank_fn, params, data.test, tcfg.eval_batch_size, eval_cap, tcfg.ks),
            "curve": curve, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0}


__all__ = ["NEGATIVE_SAMPLERS", "ModelFns", "RetrievalTrainConfig", "epoch_training_set",
           "evaluate", "fit", "hit_rate", "make_rank_fn", "make_train_step", "model_fns", "ndcg",
           "num_parameters", "optimizer", "popularity_baseline", "popularity_tables",
           "ranking_metrics", "sample_negatives", "sampled_softmax_loss", "target_ranks"]
