import time, sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, ".")
from pallas_kernels.skut import skut, SkutConfig
from pallas_kernels.skut_reference import skut_reference, EncoderWeights
exec(open("scratch/rand_w.py").read())
def timeit(f, *a, n=50):
    jax.block_until_ready(f(*a))
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter()-t)
    return np.median(ts)*1e6
print(jax.devices())
for L in [1, 7, 64, 192, 300, 2048]:
  for dt in [jnp.float32, jnp.bfloat16, jnp.float16]:
    key = jax.random.PRNGKey(L); w = rand_w(key); B = 4
    x = jax.random.normal(jax.random.fold_in(key, 1), (B, L, 64)).astype(dt)
    mask = jax.random.bernoulli(jax.random.fold_in(key, 2), 0.7, (B, L)).at[1].set(False)
    try:
        out = skut(x, mask, w)
        with jax.default_matmul_precision("highest"):
            ref64 = jax.jit(skut_reference)(x.astype(jnp.float32), mask, w)
        err = float(jnp.linalg.norm(out.astype(jnp.float32)-ref64)/jnp.linalg.norm(ref64))
        print(L, jnp.dtype(dt).name, "err", err, "nan", bool(jnp.isnan(out).any()), flush=True)
    except Exception as e:
        print(L, jnp.dtype(dt).name, "FAIL", repr(e)[:2000], flush=True)
B, L = 256, 192
key = jax.random.PRNGKey(0); w = rand_w(key)
x = jax.random.normal(key, (B, L, 64)).astype(jnp.bfloat16)
lengths = jax.random.randint(key, (B,), 1, L+1)
mask = jnp.arange(L)[None] < lengths[:, None]
ref = jax.jit(skut_reference)
print("ref us", timeit(ref, x, mask, w))
for bq in [16, 32, 64, 128]:
  for nw in [2, 4, 8]:
    for ns in [1, 2]:
      cfg = SkutConfig(bq, bq, nw, ns)
      f = jax.jit(lambda x, m, w, cfg=cfg: skut(x, m, w, config=cfg))
      try:
        print("skut", cfg, "us", timeit(f, x, mask, w), flush=True)
      except Exception as e:
        print("skut", cfg, "FAIL", repr(e)[:300], flush=True)
