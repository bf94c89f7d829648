"""The int8 embedding codec (``pallas_kernels.int8_codec``, paper §3.2.1), numpy and jax paths:
``q = clamp(round(e / 0.65 * 127), -127, 127)`` (round half to even), ``e' = q * 0.65 / 127``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int8_codec import DEQUANT_STEP, QUANT_MAX, QUANT_SCALE
from pallas_kernels.int8_codec import dequantize_int8, l2_normalize, quantize_int8

MAX_ABS_ERROR = DEQUANT_STEP / 2
"""Round-trip error bound of an in-range component: half a step."""

ALL_CODES = np.arange(-127, 128, dtype=np.int8)


def test_constants():
    assert QUANT_SCALE == 0.65
    assert QUANT_MAX == 127
    assert DEQUANT_STEP == pytest.approx(0.65 / 127, rel=1e-15)
    assert MAX_ABS_ERROR == pytest.approx(2.559e-3, abs=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_hand_picked_values(backend):
    step = 0.65 / 127
    e = np.array([0.0, -0.0, 0.65, -0.65, step, -step, 2 * step, 10 * step, -63 * step,
                  0.3 * step, 0.7 * step, -0.7 * step,
                  0.66, -0.66, 1.0, -1.0, 100.0, -1e30, np.inf, -np.inf], np.float32)
    want = np.array([0, 0, 127, -127, 1, -1, 2, 10, -63,
                     0, 1, -1,
                     127, -127, 127, -127, 127, -127, 127, -127], np.int8)
    x = e if backend == "numpy" else jnp.asarray(e)
    q = quantize_int8(x)
    if backend == "numpy":
        assert isinstance(q, np.ndarray)
    else:
        assert isinstance(q, jax.Array)
    q = np.asarray(q)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, want)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_round_half_to_even_exact_halves(backend):
    # scale=127 makes the multiplier exactly 1.0, so these are exact .5 steps.
    e = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 125.5, 126.5, -126.5, 127.5, -127.5],
                 np.float32)
    want = np.array([0, 2, 2, 4, 0, -2, -2, -4, 126, 126, -126, 127, -127], np.int8)
    x = e if backend == "numpy" else jnp.asarray(e)
    np.testing.assert_array_equal(np.asarray(quantize_int8(x, scale=127.0)), want)
    # scale = 127/4: multiplier 4.0 (exact), halves at e = (k + 0.5) / 4.
    e4 = np.array([0.125, 0.375, 0.625, -0.125, -0.375], np.float32)
    x4 = e4 if backend == "numpy" else jnp.asarray(e4)
    np.testing.assert_array_equal(np.asarray(quantize_int8(x4, scale=127.0 / 4)), [0, 2, 2, 0, -2])


def _exact_half_inputs():
    """float32 e (default scale) for which the codec's product e * (127/0.65) is exactly k + 0.5."""
    mult = np.float32(QUANT_MAX / QUANT_SCALE)
    found = []
    for k in range(-127, 127):
        target = np.float32(k + 0.5)
        e = np.float32(target / mult)
        for _ in range(8):  # walk a few ulps around the quotient
            for cand in (e, np.nextafter(e, np.float32(np.inf)), np.nextafter(e, np.float32(-np.inf))):
                if np.float32(cand * mult) == target:
                    found.append((cand, k))
                    break
            else:
                e = np.nextafter(e, np.float32(np.inf))
                continue
            break
    return found


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_round_half_to_even_default_scale(backend):
    found = _exact_half_inputs()
    assert len(found) >= 20, "expected to find many exact .5 products at the default scale"
    e = np.array([f[0] for f in found], np.float32)
    k = np.array([f[1] for f in found])
    want = np.where(k % 2 == 0, k, k + 1)  # k + 0.5 -> the even neighbour
    x = e if backend == "numpy" else jnp.asarray(e)
    np.testing.assert_array_equal(np.asarray(quantize_int8(x)).astype(int), want)


def test_matches_float64_formula_away_from_half_steps():
    rng = np.random.default_rng(11)
    e = rng.uniform(-1.0, 1.0, 200_000).astype(np.float32)
    exact = e.astype(np.float64) / 0.65 * 127
    frac = np.abs(exact - np.floor(exact) - 0.5)
    keep = frac > 1e-4  # float32 arithmetic may round differently within 1e-4 of a .5 step
    assert keep.mean() > 0.99
    want = np.clip(np.rint(exact), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(quantize_int8(e)[keep], want[keep])


def test_dequantize_all_codes_and_idempotence():
    deq = dequantize_int8(ALL_CODES)
    assert deq.dtype == np.float32
    np.testing.assert_allclose(deq, ALL_CODES.astype(np.float64) * 0.65 / 127, rtol=0, atol=1e-7)
    assert np.all(np.diff(deq) > 0)
    assert deq[0] == pytest.approx(-0.65, abs=1e-7) and deq[-1] == pytest.approx(0.65, abs=1e-7)
    assert deq[127] == 0.0
    # every code survives dequantize -> quantize unchanged (numpy and jax)
    np.testing.assert_array_equal(quantize_int8(deq), ALL_CODES)
    np.testing.assert_array_equal(np.asarray(quantize_int8(dequantize_int8(jnp.asarray(ALL_CODES)))),
                                  ALL_CODES)
    deq64 = dequantize_int8(ALL_CODES, dtype=np.float64)
    assert deq64.dtype == np.float64
    np.testing.assert_allclose(deq64, ALL_CODES * (0.65 / 127), rtol=1e-15, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_error_bound(seed):
    rng = np.random.default_rng(seed)
    e = rng.uniform(-0.65, 0.65, (4096, 32)).astype(np.float32)
    e[0, :4] = [0.65, -0.65, 0.0, DEQUANT_STEP / 2]
    back = dequantize_int8(quantize_int8(e))
    err = np.abs(back.astype(np.float64) - e.astype(np.float64))
    assert err.max() <= MAX_ABS_ERROR + 1e-6
    # the bound is tight: uniform data gets close to half a step
    assert err.max() > 0.95 * MAX_ABS_ERROR
    # mean |error| of uniform rounding is a quarter step
    assert err.mean() == pytest.approx(DEQUANT_STEP / 4, rel=0.05)
    # the jax path gives the identical codes and values
    back_j = np.asarray(dequantize_int8(quantize_int8(jnp.asarray(e))))
    np.testing.assert_array_equal(back_j, back)


def test_clamped_components_map_to_plus_minus_scale():
    rng = np.random.default_rng(5)
    mag = rng.uniform(0.651, 50.0, 1000).astype(np.float32)
    e = np.concatenate([mag, -mag])
    q = quantize_int8(e)
    np.testing.assert_array_equal(q, np.concatenate([np.full(1000, 127), np.full(1000, -127)]))
    back = dequantize_int8(q)
    np.testing.assert_allclose(back, np.sign(e) * 0.65, atol=1e-7, rtol=0)
    assert not np.any(quantize_int8(rng.normal(0, 100, 100_000).astype(np.float32)) == -128)


def test_numpy_and_jax_paths_agree():
    rng = np.random.default_rng(7)
    e64 = rng.normal(0, 0.5, (257, 32))  # includes out-of-range components
    e32 = e64.astype(np.float32)
    q_np = quantize_int8(e32)
    np.testing.assert_array_equal(np.asarray(quantize_int8(jnp.asarray(e32))), q_np)
    # float64 numpy input is computed as float32, like the jax path
    np.testing.assert_array_equal(quantize_int8(e64), q_np)
    # jitted
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize_int8)(e32)), q_np)
    # bf16 jax input: same as quantizing the exactly-upcast values
    e_bf = jnp.asarray(e32, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(quantize_int8(e_bf)),
                                  quantize_int8(np.asarray(e_bf.astype(jnp.float32))))
    d_np = dequantize_int8(q_np)
    d_j = dequantize_int8(jnp.asarray(q_np))
    assert isinstance(d_j, jax.Array) and d_j.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(d_j), d_np)
    d_bf = dequantize_int8(jnp.asarray(q_np), dtype=jnp.bfloat16)
    assert d_bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(d_bf, np.float32), d_np, rtol=1e-2, atol=0)


def test_l2_normalize():
    x = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-30, 0.0, 0.0], [-2.0, 0.0, 0.0]], np.float32)
    want = np.array([[0.6, 0.8, 0.0], [0, 0, 0], [1e-18, 0, 0], [-1.0, 0, 0]], np.float32)
    for out in (l2_normalize(x), np.asarray(l2_normalize(jnp.asarray(x)))):
        assert not np.any(np.isnan(out))
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-24)
    rng = np.random.default_rng(3)
    y = rng.normal(size=(50, 32)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(y), axis=-1), 1.0, rtol=1e-6)
