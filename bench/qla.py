"""VISTA quasi-linear attention: the jagged Pallas kernels vs the jitted jnp reference vs softmax
attention on cuDNN.

    python bench/qla.py               # GPU: history L = 1k-100k, bf16, forward and forward+backward
    python bench/qla.py --quick       # plumbing check at tiny L (interpret mode off GPU, to /tmp)
    python bench/qla.py --summarize   # headline and plot of an existing JSON (a run cut short)

Shapes follow VISTA's summarisation stage (Section 3.2; Section 5.2.2: 128 seeds, embedding 256 =
4 heads of 64; bfloat16): ``--batch`` sequences, each of L history rows followed by ``--seeds``
virtual seed rows. Implementations of one attention layer (the op only; the SGLU gate is not part
of it):

* ``kernel``: :func:`pallas_kernels.qla.api.qla` with ``impl="pallas_triton"`` (full history
  attention, as the paper uses; state, output and backward kernels);
* ``jnp``: the same op with ``impl="xla"`` (the O(N) reference: segment sums, jitted);
* ``kernel_causal`` / ``jnp_causal``: the causal option (the jnp one is a sequential scan: only
  up to ``--causal-ref-max`` rows);
* ``cudnn_softmax``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` over each
  sequence's L + seeds rows, no mask: the cost of "VISTA w/o QLA" (softmax attention; its
  seed mask would need an (N, N) bias, so the unmasked flash kernel stands in for it).

Forward: the jitted op; forward+backward: value and gradients of ``sum(out * g)`` with respect to
q, k, v. Median and p10/p90 of back-to-back calls (``bench/_env.py``; calls over 50 ms are timed
one at a time, fewer repeats); compile excluded. Correctness: the kernel's forward and gradients
against the reference at every L (max abs difference relative to the reference's max abs value).
Shared memory of the compiled kernels for sm_86 (``bench/_smem.py``: each kernel's Triton IR
compiled by the ``triton`` package at its own ``num_warps`` / ``num_stages``) and, on the GPU, the
sm_90a figures XLA logs.

Writes ``bench/results/qla.{json,png}`` (the JSON after every row); ``headline``:
``fwd_bwd_speedup_vs_jnp_L100k`` (and ``..._longest``: the longest L both ran),
``fwd_bwd_speedup_vs_cudnn_softmax_L100k``, ``time_ratio_L100k_over_L10k`` (kernel,
forward+backward: 10 for linear scaling, 100 for quadratic), ``max_smem_bytes_sm86``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Callable, Dict, Optional

import _smem

_smem.start_log()   # before jax starts (the sm_90a shared-memory report is an XLA log line)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _env import RESULTS, environment, rel_err, time_device_calls  # noqa: E402
from pallas_kernels.qla.api import qla  # noqa: E402
from pallas_kernels.qla.config import QlaConfig  # noqa: E402
from pallas_kernels.qla.pallas_triton import KERNEL_NAMES, kernel_num_stages  # noqa: E402

SLOW_CALL_S = 0.05
"""Calls slower than this are timed one at a time (``time_device_calls(calls=1)``)."""


def inputs(length: int, batch: int, seeds: int, heads: int, dim: int, dtype, seed: int = 0) -> dict:
    """``batch`` sequences of ``length`` history rows and ``seeds`` seed rows each."""
    rows = length + seeds
    total = batch * rows
    key = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = (total, heads, dim)
    return {"q": jax.random.normal(key[0], shape, dtype) * 0.5,
            "k": jax.random.normal(key[1], shape, dtype) * 0.5,
            "v": jax.random.normal(key[2], shape, dtype),
            "g": jax.random.normal(key[3], shape, dtype),
            "offsets": jnp.arange(batch + 1, dtype=jnp.int32) * rows,
            "num_targets": jnp.full((batch,), seeds, jnp.int32),
            "batch": batch, "rows": rows, "length": length}


def qla_fns(impl: str, causal: bool, x: dict, interpret: Optional[bool] = None):
    """(forward, forward+backward) of the QLA op for ``impl`` on ``x``'s shapes."""
    extra = {} if impl == "xla" else {"interpret": interpret}

    def op(q, k, v):
        return qla(q, k, v, x["offsets"], num_targets=x["num_targets"], causal=causal, impl=impl,
                   **extra)

    def loss(q, k, v, g):
        return jnp.sum(op(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))

    return jax.jit(op), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def cudnn_fns(x: dict):
    b, rows = x["batch"], x["rows"]

    def dense(a):
        return a.reshape(b, rows, *a.shape[1:])

    def op(q, k, v):
        return jax.nn.dot_product_attention(dense(q), dense(k), dense(v), implementation="cudnn")

    def loss(q, k, v, g):
        return jnp.sum(op(q, k, v).astype(jnp.float32) * dense(g).astype(jnp.float32))

    return jax.jit(op), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def correctness(x: dict, causal: bool, interpret: Optional[bool]) -> Dict[str, float]:
    """Kernel vs reference: forward and every gradient, relative max abs difference."""
    args = (x["q"], x["k"], x["v"])
    (kf, kb), (rf, rb) = qla_fns("pallas_triton", causal, x, interpret), qla_fns("xla", causal, x)
    out = {"forward": rel_err(kf(*args), rf(*args))}
    (_, kg), (_, rg) = kb(*args, x["g"]), rb(*args, x["g"])
    for name, a, b in zip(("dq", "dk", "dv"), kg, rg):
        out[name] = rel_err(a, b)
    return out


def timed(fn: Callable, args: tuple, repeats: int) -> dict:
    """``time_device_calls`` of ``fn(*args)``; slow calls one at a time with fewer repeats."""
    jax.block_until_ready(fn(*args))                      # compile and warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t0
    if once > SLOW_CALL_S:
        return time_device_calls(fn, [args], max(3, min(repeats, int(3.0 / once))), calls=1)
    return time_device_calls(fn, [args], repeats)


def time_row(name: str, fwd: Callable, fwd_bwd: Callable, args: tuple, g, repeats: int) -> dict:
    return {"impl": name, "forward": timed(fwd, args, repeats),
            "forward_backward": timed(fwd_bwd, args + (g,), repeats)}


def _kernel_name(ttir: str) -> str:
    found = re.search(r"tt\.func public @(\w+)", ttir)
    return found.group(1) if found else "?"


def smem(x: dict, interpret: Optional[bool]) -> dict:
    """Shared memory of every kernel (full and causal, forward and backward): the sm_90a figures
    XLA logs while compiling (GPU only) and the sm_86 figures of each kernel's Triton IR compiled
    with the ``triton`` package at its own ``num_warps`` / ``num_stages``
    (``pallas_triton.kernel_num_stages``)."""
    out: Dict[str, object] = {}
    args = (x["q"], x["k"], x["v"])
    for causal in (False, True):
        cfg = QlaConfig.default(x["q"].shape[-1], x["v"].shape[-1], x["q"].dtype, causal)
        _, fwd_bwd = qla_fns("pallas_triton", causal, x, interpret)
        _smem.new_log_text()
        before = len(_smem.TTIR)
        fwd_bwd.lower(*args, x["g"]).compile()
        out[f"{'causal' if causal else 'full'}_sm90_logged"] = _smem.logged_shared_bytes(
            _smem.new_log_text())
        for ir in _smem.TTIR[before:]:
            name = _kernel_name(ir)
            out[name] = _smem.sm86_shared(ir, cfg.num_warps, kernel_num_stages(name, cfg))
    sizes = [r.get("shared_bytes") for n, r in out.items() if n in KERNEL_NAMES]
    out["max_sm86"] = max(sizes) if sizes and all(s is not None for s in sizes) else None
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, phase in zip(axes, ("forward", "forward_backward")):
        by_impl: Dict[str, list] = {}
        for row in result["rows"]:
            if phase in row:
                point = (row["L"], row[phase]["median_us"] / 1e3)
                by_impl.setdefault(row["impl"], []).append(point)
        for impl, pts in by_impl.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="history length L", ylabel="ms per call",
               title=f"{phase.replace('_', ' + ')} (B={result['batch']}, {result['seeds']} seeds, "
                     f"h={result['heads']}, d={result['dim']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _time(result: dict, impl: str, length: int, phase: str = "forward_backward") -> Optional[float]:
    row = next((r for r in result["rows"] if r["impl"] == impl and r["L"] == length), None)
    return row[phase]["median_us"] if row else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def headline(result: dict) -> dict:
    """Speed-ups of the kernel (full) at L = 100k, forward+backward (and at the longest L where
    the reference ran), its L = 100k / 10k time ratio, the worst shared memory and relative error,
    from ``result``'s rows (None where a row is missing)."""
    both = sorted({r["L"] for r in result["rows"] if r["impl"] == "jnp"}
                  & {r["L"] for r in result["rows"] if r["impl"] == "kernel"})
    longest = both[-1] if both else None
    return {
        "fwd_bwd_speedup_vs_jnp_L100k": _ratio(_time(result, "jnp", 100_000),
                                               _time(result, "kernel", 100_000)),
        "fwd_bwd_speedup_vs_jnp_longest": (_ratio(_time(result, "jnp", longest),
                                                  _time(result, "kernel", longest))
                                           if longest else None),
        "fwd_bwd_speedup_vs_jnp_longest_L": longest,
        "fwd_bwd_speedup_vs_cudnn_softmax_L100k": _ratio(_time(result, "cudnn_softmax", 100_000),
                                                         _time(result, "kernel", 100_000)),
        "time_ratio_L100k_over_L10k": _ratio(_time(result, "kernel", 100_000),
                                             _time(result, "kernel", 10_000)),
        "max_smem_bytes_sm86": (result.get("smem") or {}).get("max_sm86"),
        "max_rel_err": max((v for c in result["correctness"] for k, v in c.items()
                            if k not in ("L", "causal")), default=None),
        "device": result["environment"]["device"]}


def summarize(results: str) -> dict:
    path = os.path.join(results, "qla.json")
    with open(path) as f:
        result = json.load(f)
    result["headline"] = headline(result)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(results, "qla.png"))
    print(json.dumps(result["headline"], indent=1))
    return result


def _variants(x: dict, on_gpu: bool, interpret: Optional[bool], causal_ref_max: int):
    v = [("kernel", lambda: qla_fns("pallas_triton", False, x, interpret)),
         ("jnp", lambda: qla_fns("xla", False, x)),
         ("kernel_causal", lambda: qla_fns("pallas_triton", True, x, interpret))]
    if x["batch"] * x["rows"] <= causal_ref_max:
        v.append(("jnp_causal", lambda: qla_fns("xla", True, x)))
    if on_gpu:
        v.append(("cudnn_softmax", lambda: cudnn_fns(x)))
    return v


def main(argv: Optional[list] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1000,3000,10000,30000,100000", help="history lengths L")
    ap.add_argument("--batch", type=int, default=2, help="sequences per batch")
    ap.add_argument("--seeds", type=int, default=128, help="seed rows per sequence")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64, help="D = Dv")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--causal-ref-max", type=int, default=25_000,
                    help="most rows the sequential causal jnp reference is timed at")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (interpret mode off GPU)")
    ap.add_argument("--summarize", action="store_true",
                    help="only fill the headline and plot of the JSON in --results")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(args.results)
    on_gpu = jax.default_backend() == "gpu"
    if args.quick:
        args.lengths, args.batch, args.seeds, args.heads, args.dim, args.repeats = \
            "48,100", 2, 8, 2, 16, 2
        if args.results == RESULTS:
            args.results = os.path.join("/tmp", "qla_quick")
    elif not on_gpu:
        raise SystemExit("bench/qla.py times compiled kernels: run it on a GPU "
                         "(or --quick for a plumbing check)")
    interpret = None if on_gpu else True
    _smem.capture_ttir()
    dtype = jnp.dtype(args.dtype)
    result = {"benchmark": "qla", "environment": environment(), "batch": args.batch,
              "seeds": args.seeds, "heads": args.heads, "dim": args.dim, "dtype": args.dtype,
              "rows": [], "correctness": [], "errors": []}
    os.makedirs(args.results, exist_ok=True)

    def save():
        with open(os.path.join(args.results, "qla.json"), "w") as f:
            json.dump(result, f, indent=1)

    for length in (int(s) for s in args.lengths.split(",")):
        x = inputs(length, args.batch, args.seeds, args.heads, args.dim, dtype)
        for causal in (False, True):
            if causal and x["batch"] * x["rows"] > args.causal_ref_max:
                continue
            try:
                result["correctness"].append({"L": length, "causal": causal,
                                              **correctness(x, causal, interpret)})
            except Exception as e:  # noqa: BLE001 - e.g. the reference out of memory
                result["errors"].append({"L": length, "impl": f"correctness causal={causal}",
                                         "error": repr(e)[:400]})
            save()
        qargs = (x["q"], x["k"], x["v"])
        for name, make in _variants(x, on_gpu, interpret, args.causal_ref_max):
            try:
                fwd, fwd_bwd = make()
                row = time_row(name, fwd, fwd_bwd, qargs, x["g"], args.repeats)
            except Exception as e:  # noqa: BLE001 - e.g. the reference out of memory at 100k
                result["errors"].append({"L": length, "impl": name, "error": repr(e)[:400]})
                print(f"L={length} {name}: {e!r:.200}", flush=True)
                continue
            row.update(L=length, batch=x["batch"], rows=x["batch"] * x["rows"])
            result["rows"].append(row)
            print(f"L={length:6d} {name:14s} fwd {row['forward']['median_us'] / 1e3:9.3f} ms   "
                  f"fwd+bwd {row['forward_backward']['median_us'] / 1e3:9.3f} ms", flush=True)
            save()
    small = inputs(1000 if on_gpu else 48, args.batch, args.seeds, args.heads, args.dim, dtype)
    result["smem"] = smem(small, interpret)
    result["headline"] = headline(result)
    save()
    plot(result, os.path.join(args.results, "qla.png"))
    print(json.dumps(result["headline"], indent=1))
    return result


if __name__ == "__main__":
    main()
