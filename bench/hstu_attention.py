"""HSTU attention: the jagged Pallas kernel vs the jitted jnp reference vs softmax attention on cuDNN.

    python bench/hstu_attention.py            # GPU: L = 1k-8k, bf16, forward and forward+backward
    python bench/hstu_attention.py --quick    # plumbing check at tiny L (interpret mode off GPU)

Shapes follow the paper's encoder-efficiency comparison ("Actions Speak Louder than Words", §4.2:
h = 8 heads, d_qk = 64, bfloat16): ``--tokens`` tokens per batch split into full-length sequences
of L (B = tokens / L), causal. Three implementations of one attention layer:

* ``kernel``: :func:`pallas_kernels.hstu_attention.api.hstu_attention` with ``impl="pallas_triton"``
  (jagged; forward kernel, dq and dkv kernels in the backward);
* ``jnp``: the same op with ``impl="xla"`` (the dense reference, jitted);
* ``cudnn_softmax``: ``jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")``,
  the softmax transformer attention the paper compares with (FlashAttention-2 there).

HSTU is timed without rab (as the paper's comparison does) and, as a second kernel row, with both
rab tables. Forward: the jitted op; forward+backward: value and gradients of ``sum(out * g)`` with
respect to q, k, v (and the rab tables when present). Median and p10/p90 of back-to-back calls
(``bench/_env.py``); compile excluded. Correctness: the kernel's forward and gradients against the
reference at every L (max abs difference relative to the reference's max abs value). Shared memory
of the compiled kernels for sm_86 (``bench/_smem.py``).

Writes ``bench/results/hstu_attention.{json,png}``; ``headline``: ``fwd_bwd_speedup_vs_jnp_L4096``,
``fwd_bwd_speedup_vs_cudnn_softmax_L4096``, ``max_smem_bytes_sm86``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Dict, Optional

import _smem

_smem.start_log()   # before jax starts (the sm_90a shared-memory report is an XLA log line)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _env import RESULTS, environment, rel_err, time_device_calls  # noqa: E402
from pallas_kernels.hstu_attention.api import hstu_attention  # noqa: E402
from pallas_kernels.hstu_attention.reference import NUM_POS_BUCKETS, NUM_TIME_BUCKETS  # noqa: E402


def inputs(length: int, tokens: int, heads: int, dim: int, dtype, seed: int = 0) -> dict:
    b = max(tokens // length, 1)
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    t = b * length
    shape = (t, heads, dim)
    return {"q": jax.random.normal(k[0], shape, dtype) * 0.5,
            "k": jax.random.normal(k[1], shape, dtype) * 0.5,
            "v": jax.random.normal(k[2], shape, dtype),
            "g": jax.random.normal(k[3], shape, dtype),
            "offsets": jnp.arange(b + 1, dtype=jnp.int32) * length,
            "timestamps": jnp.cumsum(jax.random.randint(k[4], (t,), 0, 3600), dtype=jnp.int32),
            "rab_pos": jax.random.normal(k[5], (NUM_POS_BUCKETS,), jnp.float32) * 0.1,
            "rab_time": jax.random.normal(k[6], (NUM_TIME_BUCKETS,), jnp.float32) * 0.1,
            "batch": b, "length": length}


def hstu_fns(impl: str, rab: bool, x: dict):
    """(forward, forward+backward) of the HSTU op for ``impl`` on ``x``'s shapes."""
    length = x["length"]

    def op(q, k, v, rab_pos, rab_time):
        extra = dict(timestamps=x["timestamps"], rab_pos=rab_pos, rab_time=rab_time) if rab else {}
        return hstu_attention(q, k, v, x["offsets"], max_seq_len=length, causal=True, impl=impl,
                              **extra)

    def loss(q, k, v, rab_pos, rab_time, g):
        return jnp.sum(op(q, k, v, rab_pos, rab_time).astype(jnp.float32) * g.astype(jnp.float32))

    argnums = (0, 1, 2, 3, 4) if rab else (0, 1, 2)
    fwd = jax.jit(op)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    return fwd, fwd_bwd


def cudnn_fns(x: dict):
    b, length = x["batch"], x["length"]

    def dense(a):
        return a.reshape(b, length, *a.shape[1:])

    def op(q, k, v):
        return jax.nn.dot_product_attention(dense(q), dense(k), dense(v), is_causal=True,
                                            implementation="cudnn")

    def loss(q, k, v, g):
        return jnp.sum(op(q, k, v).astype(jnp.float32) * dense(g).astype(jnp.float32))

    return jax.jit(op), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def correctness(x: dict, rab: bool) -> Dict[str, float]:
    """Kernel vs reference: forward and every gradient, relative max abs difference."""
    args = (x["q"], x["k"], x["v"], x["rab_pos"], x["rab_time"])
    out = {}
    (kf, kb), (rf, rb) = hstu_fns("pallas_triton", rab, x), hstu_fns("xla", rab, x)
    out["forward"] = rel_err(kf(*args), rf(*args))
    (_, kg), (_, rg) = kb(*args, x["g"]), rb(*args, x["g"])
    for name, a, b in zip(("dq", "dk", "dv", "drab_pos", "drab_time"), kg, rg):
        out[name] = rel_err(a, b)
    return out


def time_row(name: str, fwd: Callable, fwd_bwd: Callable, args: tuple, g, repeats: int) -> dict:
    row = {"impl": name}
    row["forward"] = time_device_calls(fwd, [args], repeats)
    row["forward_backward"] = time_device_calls(fwd_bwd, [args + (g,)], repeats)
    return row


def smem(x: dict) -> dict:
    """sm_86 shared memory of the forward kernel and of the backward kernels (with rab)."""
    fwd, fwd_bwd = hstu_fns("pallas_triton", True, x)
    args = (x["q"], x["k"], x["v"], x["rab_pos"], x["rab_time"])
    f = _smem.measure(lambda: fwd.lower(*args).compile(), 4, 2)
    b = _smem.measure(lambda: fwd_bwd.lower(*args, x["g"]).compile(), 4, 1)
    sizes = [r.get("sm86", {}).get("shared_bytes") for r in (f, b)]
    return {"forward": f, "forward_backward": b,
            "max_sm86": max(sizes) if all(s is not None for s in sizes) else None}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, phase in zip(axes, ("forward", "forward_backward")):
        by_impl: Dict[str, list] = {}
        for row in result["rows"]:
            if phase in row:
                by_impl.setdefault(row["impl"], []).append((row["L"], row[phase]["median_us"] / 1e3))
        for impl, pts in by_impl.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="ms per call",
               title=f"{phase.replace('_', ' + ')} ({result['tokens']} tokens, h={result['heads']}, "
                     f"d={result['dim']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def headline(result: dict) -> dict:
    """Speed-ups of the kernel (no rab) at L = 4,096, forward+backward, the worst shared memory and
    the worst relative error, from ``result``'s rows (None where a row is missing)."""
    def t(impl: str, length: int) -> Optional[float]:
        row = next((r for r in result["rows"] if r["impl"] == impl and r["L"] == length), None)
        return row["forward_backward"]["median_us"] if row else None

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a and b else None

    return {
        "fwd_bwd_speedup_vs_jnp_L4096": ratio(t("jnp", 4096), t("kernel", 4096)),
        "fwd_bwd_speedup_vs_cudnn_softmax_L4096": ratio(t("cudnn_softmax", 4096), t("kernel", 4096)),
        "max_smem_bytes_sm86": (result.get("smem") or {}).get("max_sm86"),
        "max_rel_err": max((v for c in result["correctness"] for k, v in c.items()
                            if k not in ("L", "rab")), default=None),
        "device": result["environment"]["device"]}


def main(argv: Optional[list] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens / L)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64, help="d_qk = d_v")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (interpret mode off GPU)")
    ap.add_argument("--summarize", action="store_true",
                    help="only fill the headline and plot of the JSON in --results (a run cut short)")
    args = ap.parse_args(argv)
    if args.summarize:
        path = os.path.join(args.results, "hstu_attention.json")
        with open(path) as f:
            result = json.load(f)
        result["headline"] = headline(result)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.join(args.results, "hstu_attention.png"))
        print(json.dumps(result["headline"], indent=1))
        return result
    on_gpu = jax.default_backend() == "gpu"
    if args.quick:
        args.lengths, args.tokens, args.heads, args.dim, args.repeats = "32,64", 128, 2, 16, 2
        if args.results == RESULTS:
            args.results = os.path.join("/tmp", "hstu_attention_quick")
    elif not on_gpu:
        raise SystemExit("bench/hstu_attention.py times compiled kernels: run it on a GPU "
                         "(or --quick for a plumbing check)")
    _smem.capture_ttir()
    dtype = jnp.dtype(args.dtype)
    result = {"benchmark": "hstu_attention", "environment": environment(), "tokens": args.tokens,
              "heads": args.heads, "dim": args.dim, "dtype": args.dtype, "rows": [],
              "correctness": [], "errors": []}
    os.makedirs(args.results, exist_ok=True)

    def save():
        with open(os.path.join(args.results, "hstu_attention.json"), "w") as f:
            json.dump(result, f, indent=1)

    for length in (int(s) for s in args.lengths.split(",")):
        x = inputs(length, args.tokens, args.heads, args.dim, dtype)
        hargs = (x["q"], x["k"], x["v"], x["rab_pos"], x["rab_time"])
        for rab in (False, True):
            result["correctness"].append({"L": length, "rab": rab,
                                          **correctness(x, rab)})
        variants = [("kernel", lambda: hstu_fns("pallas_triton", False, x), hargs),
                    ("kernel_rab", lambda: hstu_fns("pallas_triton", True, x), hargs),
                    ("jnp", lambda: hstu_fns("xla", False, x), hargs)]
        if on_gpu:
            variants.append(("cudnn_softmax", lambda: cudnn_fns(x), (x["q"], x["k"], x["v"])))
        for name, make, a in variants:
            try:
                fwd, fwd_bwd = make()
                row = time_row(name, fwd, fwd_bwd, a, x["g"], args.repeats)
            except Exception as e:  # noqa: BLE001 - e.g. the dense reference out of memory at 8k
                result["errors"].append({"L": length, "impl": name, "error": repr(e)[:400]})
                print(f"L={length} {name}: {e!r:.200}", flush=True)
                continue
            row.update(L=length, batch=x["batch"])
            result["rows"].append(row)
            print(f"L={length:5d} {name:14s} fwd {row['forward']['median_us'] / 1e3:8.3f} ms   "
                  f"fwd+bwd {row['forward_backward']['median_us'] / 1e3:8.3f} ms", flush=True)
            save()
    result["smem"] = smem(inputs(1024 if on_gpu else 64, args.tokens, args.heads, args.dim, dtype))
    result["headline"] = headline(result)
    save()
    plot(result, os.path.join(args.results, "hstu_attention.png"))
    print(json.dumps(result["headline"], indent=1))
    return result


if __name__ == "__main__":
    main()
