"""The validated int8 codec wrappers of ``transact_jax.data.quantization`` (the raw codec,
``pallas_kernels.int8_codec``, is tested in ``tests/kernels/test_int8_codec.py``)."""
from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.int8_codec import DEQUANT_STEP, dequantize_int8, quantize_int8
from transact_jax.data.quantization import MAX_ABS_ERROR, dequantize, quantize
from transact_jax.data.schema import SchemaError


def test_max_abs_error_is_half_a_step():
    assert MAX_ABS_ERROR == pytest.approx(0.65 / 127 / 2, rel=1e-15)
    assert MAX_ABS_ERROR == pytest.approx(2.559e-3, abs=1e-6)
    assert MAX_ABS_ERROR == pytest.approx(DEQUANT_STEP / 2, rel=1e-15)


def test_validated_quantize_matches_codec():
    rng = np.random.default_rng(9)
    e = rng.normal(0, 0.4, (10, 32)).astype(np.float32)
    np.testing.assert_array_equal(quantize(e, dim=32), quantize_int8(e))
    q = quantize(e)
    np.testing.assert_array_equal(dequantize(q), dequantize_int8(q))
    assert dequantize(q).dtype == np.float32


@pytest.mark.parametrize("bad, kwargs, problem", [
    (np.array([[0.1, np.nan]], np.float32), {}, "NaN"),
    (np.array([0.1, np.inf], np.float64), {}, "NaN/inf"),
    (np.array([-np.inf], np.float32), {}, "NaN/inf"),
    (np.array([1, 2, 3], np.int32), {}, "dtype"),
    (np.array([1, 2, 3], np.int8), {}, "dtype"),
    (np.array([True]), {}, "dtype"),
    (np.zeros((4, 16), np.float32), {"dim": 32}, "last dimension 32"),
    (np.float32(0.1), {"dim": 32}, "last dimension 32"),
])
def test_validated_quantize_rejects(bad, kwargs, problem):
    with pytest.raises(SchemaError, match=problem) as info:
        quantize(bad, **kwargs)
    assert info.value.field == "embeddings"
    with pytest.raises(SchemaError) as info:
        quantize(bad, name="cand_embedding", **kwargs)
    assert info.value.field == "cand_embedding"
    assert str(info.value).startswith("cand_embedding:")


def test_validated_quantize_nan_position_reported():
    e = np.zeros((3, 32), np.float32)
    e[2, 5] = np.nan
    with pytest.raises(SchemaError, match=r"\(2, 5\)"):
        quantize(e)


@pytest.mark.parametrize("bad, problem", [
    (np.array([0, -128, 3], np.int8), "-128"),
    (np.array([0, 1], np.int16), "int8"),
    (np.array([0.0, 1.0], np.float32), "int8"),
    (np.array([0, 1], np.uint8), "int8"),
])
def test_validated_dequantize_rejects(bad, problem):
    with pytest.raises(SchemaError, match=problem) as info:
        dequantize(bad, name="seq")
    assert info.value.field == "seq"
    assert isinstance(info.value, ValueError)
