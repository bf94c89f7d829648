"""Stochastic Length (transact_jax.data.stochastic_length, "Actions Speak Louder than Words" §3.2
eq. (4) and Appendix F): config checks, the keep-whole rule and its probability, the three
subsequence selections, determinism, aligned arrays, sparsity, and the retrieval training set's
retargeting."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from transact_jax.config_json import ConfigError
from transact_jax.data.stochastic_length import (
    METHODS,
    StochasticLengthConfig,
    attention_sparsity_s2,
    keep_whole_probability,
    select,
    sparsity,
    subsample,
)
from transact_jax.retrieval.data import SequenceSet, subsample_training
from transact_jax.retrieval.train import (
    RetrievalTrainConfig,
    epoch_training_set,
    fit,
    make_train_step,
)


def jagged(lengths, times=None):
    """Offsets of ``lengths`` and per-token timestamps (default: 10 s apart within a sequence)."""
    lengths = np.asarray(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if times is None:
        times = np.concatenate([np.arange(n) * 10 for n in lengths]).astype(np.int32)
    return offsets, np.asarray(times)


def kept_per_sequence(keep, offsets, new_offsets):
    """Each sequence's kept positions (0-based within the original sequence)."""
    return [keep[a:b] - offsets[j] for j, (a, b) in enumerate(zip(new_offsets[:-1],
                                                                   new_offsets[1:]))]


# --------------------------------------------------------------------------------------- config


def test_config_errors_name_the_field_and_the_threshold():
    for field, value in [("alpha", 1.0), ("alpha", 2.5), ("alpha", float("nan")), ("max_len", 0),
                         ("method", "smart")]:
        with pytest.raises(ConfigError) as err:
            StochasticLengthConfig(**{"max_len": 100, field: value})
        assert err.value.field == field
    for field, value in [("stochastic_length_alpha", 0.5), ("stochastic_length_method", "x")]:
        with pytest.raises(ConfigError) as err:
            RetrievalTrainConfig(**{field: value})
        assert err.value.field == field
    assert StochasticLengthConfig(1024, 1.6).threshold == 256            # 1024 ** 0.8, exactly
    assert StochasticLengthConfig(100, 1.5).threshold == 31              # floor(31.62)
    assert StochasticLengthConfig(200).threshold == 200
    assert not StochasticLengthConfig(200).enabled and StochasticLengthConfig(200, 1.9).enabled
    assert StochasticLengthConfig(8).method == "feature_weighted"
    assert RetrievalTrainConfig().stochastic_length(200) is None
    assert RetrievalTrainConfig(stochastic_length_alpha=1.5).stochastic_length(200) == \
        StochasticLengthConfig(200, 1.5, "feature_weighted")


# ------------------------------------------------------------------------------------ eq. (4)


@pytest.mark.parametrize("method", METHODS)
def test_alpha_two_keeps_everything_up_to_max_len(method):
    offsets, times = jagged([0, 1, 7, 50, 50, 3])
    cfg = StochasticLengthConfig(50, 2.0, method)
    keep, new_offsets = select(offsets, times, cfg, np.random.default_rng(0))
    assert keep.tolist() == list(range(offsets[-1])) and new_offsets.tolist() == offsets.tolist()
    assert np.all(keep_whole_probability(np.arange(51), cfg) == 1.0)


def test_sequences_up_to_the_threshold_are_kept_whole():
    cfg = StochasticLengthConfig(100, 1.5, "random")                       # L = 31
    offsets, times = jagged([31, 1, 20, 31] * 50)
    keep, new_offsets = select(offsets, times, cfg, np.random.default_rng(1))
    assert keep.tolist() == list(range(offsets[-1])) and new_offsets.tolist() == offsets.tolist()


@pytest.mark.parametrize("n", [60, 150])                        # 150 > N_c = 100 is allowed too
def test_keep_whole_probability_matches_eq4(n):
    cfg = StochasticLengthConfig(100, 1.5)
    draws = 4000
    offsets, times = jagged([n] * draws)
    _, new_offsets = select(offsets, times, cfg, np.random.default_rng(2))
    lengths = np.diff(new_offsets)
    assert set(np.unique(lengths)) == {n, cfg.threshold}
    p = 100 ** 1.5 / n ** 2                                    # 0.278 and 0.044
    assert keep_whole_probability(np.array([n]), cfg)[0] == pytest.approx(p)
    assert np.mean(lengths == n) == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / draws))


@pytest.mark.parametrize("method", METHODS)
def test_subsequences_have_length_L_in_order_within_their_sequence(method):
    cfg = StochasticLengthConfig(20, 1.4, method)                          # L = floor(20**0.7) = 8
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 25, size=300)
    times = np.concatenate([np.sort(rng.integers(0, 1000, n)) for n in lengths]).astype(np.int32)
    offsets, times = jagged(lengths, times)
    keep, new_offsets = select(offsets, times, cfg, rng)
    assert keep.dtype == np.int64 and len(keep) == new_offsets[-1]
    new_lengths = np.diff(new_offsets)
    assert np.all((new_lengths == lengths) | ((lengths > 8) & (new_lengths == 8)))
    assert np.any(new_lengths < lengths)
    for n, positions in zip(lengths, kept_per_sequence(keep, offsets, new_offsets)):
        assert np.all(np.diff(positions) > 0) and np.all((positions >= 0) & (positions < n))


def test_greedy_keeps_the_most_recent():
    cfg = StochasticLengthConfig(16, 1.5, "greedy")                        # L = 8
    rng = np.random.default_rng(4)
    lengths = [30] * 40
    times = np.concatenate([rng.permutation(1000)[:30] for _ in lengths])   # unsorted, distinct
    offsets, times = jagged(lengths, times)
    keep, new_offsets = select(offsets, times, cfg, rng)
    for j, positions in enumerate(kept_per_sequence(keep, offsets, new_offsets)):
        t = times[offsets[j]:offsets[j + 1]]
        if len(positions) == 8:
            assert sorted(positions) == sorted(np.argsort(t)[-8:])
    # equal timestamps: the latest positions
    offsets, times = jagged([30] * 40, np.zeros(1200, np.int32))
    keep, new_offsets = select(offsets, times, cfg, rng)
    cut = [p for p in kept_per_sequence(keep, offsets, new_offsets) if len(p) == 8]
    assert cut and all(p.tolist() == list(range(22, 30)) for p in cut)


def _single_draw_frequencies(times, draws=6000, seed=5):
    """N_c = 1 gives L = 1: one token of each 3-token sequence, drawn with the selection weights
    (keep-whole probability 1/9)."""
    offsets, flat = jagged([3] * draws, np.tile(times, draws))
    cfg = StochasticLengthConfig(1, 1.5)
    keep, new_offsets = select(offsets, flat, cfg, np.random.default_rng(seed))
    one = np.diff(new_offsets) == 1
    return np.bincount((keep[new_offsets[:-1]] - offsets[:-1])[one], minlength=3) / one.sum()


def test_feature_weighted_draws_by_one_minus_the_elapsed_share():
    # f = (100, 50, 0), sum 150: weights 1/3, 2/3, 1 -> probabilities 1/6, 1/3, 1/2
    np.testing.assert_allclose(_single_draw_frequencies([0, 50, 100]), [1 / 6, 1 / 3, 1 / 2],
                               atol=0.03)
    np.testing.assert_allclose(_single_draw_frequencies([7, 7, 7]), [1 / 3] * 3, atol=0.03)
    # f = (100, 0, 0): the first token holds all the elapsed time, weight 0, never drawn
    freq = _single_draw_frequencies([0, 100, 100])
    assert freq[0] == 0 and freq[1:] == pytest.approx([0.5, 0.5], abs=0.03)


def test_feature_weighted_prefers_recent_tokens_over_random():
    # ages f = (100, 10, 1, 0): weights (0.09, 0.91, 0.99, 1); random keeps a mean age of 27.75
    offsets, times = jagged([4] * 3000, np.tile(np.array([0, 90, 99, 100]), 3000))

    def mean_age(method):
        cfg = StochasticLengthConfig(4, 1.2, method)                       # L = 2, p = 0.33
        keep, new_offsets = select(offsets, times, cfg, np.random.default_rng(6))
        cut = np.repeat(np.diff(new_offsets) == 2, np.diff(new_offsets))
        return np.mean(100 - times[keep][cut])

    assert mean_age("greedy") == 0.5                                    # ages 1 and 0
    assert mean_age("feature_weighted") < mean_age("random") - 10
    assert mean_age("random") == pytest.approx(27.75, abs=1.5)


def test_equal_seeds_give_equal_draws():
    offsets, times = jagged(np.random.default_rng(7).integers(0, 60, 200))
    cfg = StochasticLengthConfig(40, 1.3)
    a = select(offsets, times, cfg, np.random.default_rng(8))
    b = select(offsets, times, cfg, np.random.default_rng(8))
    c = select(offsets, times, cfg, np.random.default_rng(9))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_subsample_takes_aligned_arrays_at_the_kept_tokens():
    offsets, times = jagged([40, 3, 40])
    cfg = StochasticLengthConfig(40, 1.2, "random")
    arrays = {"ids": np.arange(83) * 2, "times": times, "vec": np.arange(166).reshape(83, 2)}
    new_offsets, out = subsample(offsets, times, arrays, cfg, np.random.default_rng(10))
    keep, same_offsets = select(offsets, times, cfg, np.random.default_rng(10))
    assert new_offsets.tolist() == same_offsets.tolist()
    assert out["ids"].tolist() == (2 * keep).tolist()
    assert out["times"].tolist() == times[keep].tolist()
    assert out["vec"].shape == (len(keep), 2)
    with pytest.raises(ValueError, match="ids"):
        subsample(offsets, times, {"ids": np.arange(82)}, cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="timestamps"):
        select(offsets, times[:-1], cfg, np.random.default_rng(0))


def test_sparsity_on_a_hand_computed_example():
    assert sparsity([2, 4], 4) == pytest.approx(0.25)                 # 1 - 3 / 4
    assert attention_sparsity_s2([2, 4], 4) == pytest.approx(0.375)   # 1 - (4 + 16) / (2 * 16)
    assert sparsity([8, 8], 8) == 0.0 and attention_sparsity_s2([8, 8], 8) == 0.0
    with pytest.raises(ValueError, match="lengths"):
        sparsity([], 4)
    with pytest.raises(ValueError, match="max_len"):
        attention_sparsity_s2([1], 0)


# ----------------------------------------------------------------------------------- retrieval


def training_set():
    """Sequence 0: items 1..10 with next-item targets 2..11; sequence 1: items 20, 21 -> 21, 22."""
    items = np.r_[np.arange(1, 11), [20, 21]].astype(np.int32)
    targets = np.r_[np.arange(2, 12), [21, 22]].astype(np.int32)
    return SequenceSet(items, (np.arange(12) * 60).astype(np.int32), targets,
                       np.array([0, 10, 12], np.int64))


@pytest.mark.parametrize("method", METHODS)
def test_subsampled_training_sequences_predict_the_next_kept_item(method):
    data = training_set()
    cfg = StochasticLengthConfig(10, 1.2, method)                       # L = 3, p = 0.16
    cut_seen = 0
    for seed in range(20):
        out = subsample_training(data, cfg, np.random.default_rng(seed))
        assert out.items[out.offsets[1]:].tolist() == [20, 21]          # short: kept whole
        assert out.targets[out.offsets[1]:].tolist() == [21, 22]
        items, targets = out.items[:out.offsets[1]], out.targets[:out.offsets[1]]
        np.testing.assert_array_equal(out.timestamps[:out.offsets[1]], (items - 1) * 60)
        if len(items) == 10:
            assert targets.tolist() == list(range(2, 12))
            continue
        cut_seen += 1
        assert len(items) == 3
        # next kept item, then the last kept item's original target (its successor in time)
        assert targets.tolist() == [items[1], items[2], items[2] + 1]
    assert cut_seen > 10


def test_epoch_training_sets_are_redrawn_per_epoch_and_reproducible():
    data = training_set()
    sl = RetrievalTrainConfig(stochastic_length_alpha=1.2,
                              stochastic_length_method="random").stochastic_length(10)
    assert epoch_training_set(data, None, 0, 1) is data
    draws = [epoch_training_set(data, sl, 0, e).items.tolist() for e in range(1, 9)]
    again = [epoch_training_set(data, sl, 0, e).items.tolist() for e in range(1, 9)]
    assert draws == again and len({tuple(d) for d in draws}) > 1


def test_fit_with_stochastic_length_compiles_the_step_once():
    from tests.test_retrieval import TINY, cyclic_data
    d = cyclic_data(users=40)
    cfg = dataclasses.replace(TINY, model="sasrec", num_items=d.num_items, max_len=8, num_heads=1)
    tcfg = RetrievalTrainConfig(batch_size=16, max_epochs=3, num_negatives=8, eval_every=3,
                                ks=(10,), stochastic_length_alpha=1.2,
                                stochastic_length_method="greedy")      # L = floor(8**0.6) = 3
    r = fit(cfg, tcfg, d, seed=0)
    assert np.isfinite(r["curve"]["train_loss"]).all() and r["epochs"] == 3
    assert make_train_step(cfg, tcfg)._cache_size() == 1
