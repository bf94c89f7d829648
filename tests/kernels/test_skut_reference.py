"""The encoder reference (``pallas_kernels.skut.reference``): torch semantics, masks, dtypes, no NaN."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skut.reference import EncoderWeights, masked_softmax, skut_reference
from tests.kernels.skut_cases import numpy_encoder, random_weights

run = jax.jit(skut_reference, static_argnames=("num_heads", "causal"))


def ragged_mask(rng, b, length):
    mask = rng.random((b, length)) < 0.7
    mask[0] = False                     # a row with no valid key at all
    if b > 1:
        mask[1, : length // 2] = False  # leading padding: early queries see nothing
    return mask


FLOAT64_CASES = [(1, 1, True), (7, 1, True), (13, 2, True), (9, 1, False)]
"""(length, num_heads, causal) of the float64 loop comparisons."""


def check_matches_float64_loops(w: EncoderWeights, length: int, num_heads: int, causal: bool):
    """The reference with weights ``w`` against the float64 loops on ragged random inputs."""
    rng = np.random.default_rng([length, num_heads, causal])
    x = rng.normal(size=(3, length, w.d_model)).astype(np.float32)
    mask = ragged_mask(rng, 3, length)
    with jax.default_matmul_precision("highest"):  # full f32 products on GPUs too (no TF32)
        got = np.asarray(run(jnp.asarray(x), jnp.asarray(mask), w, num_heads=num_heads, causal=causal))
    want = numpy_encoder(x, mask, w, num_heads, causal)
    assert np.all(np.isfinite(got))
    valid = mask.astype(bool)
    err = np.linalg.norm(got[valid] - want[valid]) / max(np.linalg.norm(want[valid]), 1e-12)
    assert err < 1e-5, err


@pytest.mark.parametrize("length,num_heads,causal", FLOAT64_CASES)
def test_matches_float64_loops(length, num_heads, causal):
    check_matches_float64_loops(random_weights(length), length, num_heads, causal)


def test_bf16_close_to_f32():
    rng = np.random.default_rng(1)
    w = random_weights(3)
    x = rng.normal(size=(4, 48, 64)).astype(np.float32)
    mask = ragged_mask(rng, 4, 48)
    f32 = np.asarray(run(jnp.asarray(x), jnp.asarray(mask), w))
    bf16 = np.asarray(run(jnp.asarray(x, jnp.bfloat16), jnp.asarray(mask), w)).astype(np.float32)
    assert bf16.dtype == np.float32 and np.all(np.isfinite(bf16))
    err = np.linalg.norm(bf16[mask] - f32[mask]) / np.linalg.norm(f32[mask])
    assert 1e-4 < err < 3e-2, err   # bf16 operands: visibly lossy, still close


def test_padding_and_future_do_not_leak():
    rng = np.random.default_rng(2)
    w = random_weights(4)
    x = rng.normal(size=(1, 10, 64)).astype(np.float32)
    mask = np.ones((1, 10), bool)
    mask[0, 3] = False
    with jax.default_matmul_precision("highest"):
        y = np.asarray(run(jnp.asarray(x), jnp.asarray(mask), w))
    x2 = x.copy()
    x2[0, 3] = 1e4          # padding token: huge garbage
    x2[0, 7:] = -1e4        # future tokens
    with jax.default_matmul_precision("highest"):
        y2 = np.asarray(run(jnp.asarray(x2), jnp.asarray(mask), w))
    np.testing.assert_allclose(y2[0, :3], y[0, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2[0, 4:7], y[0, 4:7], rtol=1e-5, atol=1e-5)


def test_masked_softmax_empty_row_is_zero():
    s = jnp.array([[1.0, 2.0], [3.0, -np.inf]])
    vis = jnp.array([[False, False], [True, False]])
    p = np.asarray(masked_softmax(s, vis))
    np.testing.assert_array_equal(p, [[0, 0], [1, 0]])
    g = jax.grad(lambda s: masked_softmax(s, vis).sum())(s)
    assert np.all(np.isfinite(np.asarray(g)))


def test_matches_torch_transformer_encoder():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=1, dim_feedforward=32, dropout=0.0,
                                             activation="relu", batch_first=True, norm_first=False)
    enc = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    sd = {k: v.detach().numpy() for k, v in enc.state_dict().items()}
    w = EncoderWeights.from_torch(sd, num_layers=2)
    rng = np.random.default_rng(5)
    b, length = 4, 192
    x = rng.normal(size=(b, length, 64)).astype(np.float32)
    mask = rng.random((b, length)) < 0.8
    mask[:, 0] = True  # every query then sees a key, so torch gives no NaN rows
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        want = enc(torch.from_numpy(x), mask=causal, src_key_padding_mask=torch.from_numpy(~mask)).numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(run(jnp.asarray(x), jnp.asarray(mask), w))
    err = np.linalg.norm(got[mask] - want[mask]) / np.linalg.norm(want[mask])
    assert err < 1e-5, err
