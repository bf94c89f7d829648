"""NN-search benchmark (paper §3.4.2 "broadcast free NN search", "fused dequantization").

For L_LL in {1k, 4k, 10k, 16k} and {64, 256, 1024} candidates per request (4096 candidates per
batch; U = 4096 / candidates-per-request requests, every sequence full length), K = 96 (K_LL):

* ``kernel``: ``pallas_kernels.nn_search.api.nn_search(..., offsets=..., impl="pallas_triton")``
  on the de-duplicated jagged layout (one int8 copy per request + candidate -> request index),
  everything inside the jitted call (grouping candidates by request, the kernel);
* ``broadcast``: the XLA pipeline on the broadcast layout, a (N, L, 32) int8 tensor with the
  request's sequence repeated per candidate (what a broadcasting server ships to the GPU):
  dequantize, L2-normalize, ``einsum``, ``lax.top_k`` (+ the chronological sort of the result);
* ``dedup``: the de-duplicated XLA pipeline: dequantize + normalize each request's sequence once,
  one ``einsum`` per request against its candidates (U, C, L), ``lax.top_k``; with float32 scores
  at ``precision=HIGHEST`` (the kernel's semantics) and at XLA's default precision (TF32 on H100,
  not exact), the faster of which is the "best de-duplicated" baseline.

Reported per shape: median / p10 / p90 latency (10 back-to-back calls per sample, compile excluded),
index agreement with the exact reference, the HBM floor (int8 sequences + candidates + outputs, each
once) and the kernel's estimated on-chip re-reads, the FLOP floor (2 N L D), and host-to-device
bytes of the sequence in the two layouts. Also Triton's shared memory for the shipped config (sm_90a
report and sm_86 compile).

    python bench/nn_search.py            # full sweep (GPU machine, ~4 min)
    python bench/nn_search.py --quick    # L = 10k, 256 candidates per request only
    python bench/nn_search.py --quick --profile   # + the kernel stopped after step 2 (bound) /
                                                  # step 3 (collect), and the forced fallback
                                                  # (pallas_kernels.nn_search.profile)
    python bench/nn_search.py --quick --tune      # + other tilings

Writes ``bench/results/nn_search.json``, ``nn_search.png`` and ``nn_search.md``.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

if __name__ == "__main__":
    import _smem
    _smem.start_log()   # before jax starts

import dataclasses  # noqa: E402
import json  # noqa: E402
from typing import Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import _smem  # noqa: E402
from _env import RESULTS, environment, time_device_calls  # noqa: E402
from pallas_kernels._common import A10G_SMEM_BYTES  # noqa: E402
from pallas_kernels.int8_codec import QUANT_SCALE, dequantize_int8, l2_normalize  # noqa: E402
from pallas_kernels.nn_search.api import nn_search  # noqa: E402
from pallas_kernels.nn_search.config import MAX_K, NNSearchConfig  # noqa: E402
from pallas_kernels.nn_search.profile import STOP_AFTER, nn_search_stopped  # noqa: E402
from pallas_kernels.nn_search.reference import masked_top_k  # noqa: E402

D, K, N_TOTAL = 32, 96, 4096
LENGTHS = (1024, 4096, 10_000, 16_384)
CANDS = (64, 256, 1024)
CALLS = 10
PASSES = 2   # bound + collect passes of the kernel (the fallback adds 9 when it runs)


def time_jax(fn, args, repeats: int) -> dict:
    return time_device_calls(fn, [args], repeats, CALLS)


def broadcast_pipeline(precision):
    @jax.jit
    def run(seq_b, lengths_b, cand):
        seq = l2_normalize(dequantize_int8(seq_b, QUANT_SCALE, jnp.float32))       # (N, L, D)
        c = l2_normalize(cand.astype(jnp.float32))
        scores = jnp.einsum("nld,nd->nl", seq, c, precision=precision)
        valid = jnp.arange(seq_b.shape[1])[None, :] < lengths_b[:, None]
        return masked_top_k(scores, valid, K)
    return run


def dedup_pipeline(precision):
    @jax.jit
    def run(seq_q, lengths, cand_grid):
        seq = l2_normalize(dequantize_int8(seq_q, QUANT_SCALE, jnp.float32))       # (U, L, D)
        c = l2_normalize(cand_grid.astype(jnp.float32))                            # (U, C, D)
        scores = jnp.einsum("uld,ucd->ucl", seq, c, precision=precision)
        valid = (jnp.arange(seq_q.shape[1])[None, :] < lengths[:, None])[:, None, :]
        return masked_top_k(scores, jnp.broadcast_to(valid, scores.shape), K)
    return run


def kernel_pipeline(config: NNSearchConfig, stop_after: Optional[int] = None):
    """The kernel on the jagged layout (``stop_after`` 2 / 3: the profiling kernel stopped after
    the bound / the collect step; its outputs are not search results)."""
    if stop_after is None:
        @jax.jit
        def run(flat, offsets, lengths, cand, c2r):
            return nn_search(flat, lengths, cand, c2r, k=K, offsets=offsets, impl="pallas_triton",
                             config=config)
        return run
    return jax.jit(functools.partial(nn_search_stopped, k=K, stop_after=stop_after, config=config,
                                     interpret=False))


def variant_name(v: NNSearchConfig) -> str:
    return (f"kernel_c{v.block_c}_t{v.block_t}_w{v.num_warps}_s{v.num_stages}"
            f"_r{v.radix_bits}_{v.scores}_b{v.bins}_v{v.survivors}_u{v.unroll}")


def run_shape(length: int, cpr: int, repeats: int, config: NNSearchConfig, variants=(),
              profile=()) -> dict:
    u = N_TOTAL // cpr
    n = u * cpr
    rng = np.random.default_rng(length + cpr)
    seq = jnp.asarray(rng.integers(-127, 128, (u, length, D)).astype(np.int8))
    lengths = jnp.full((u,), length, jnp.int32)
    cand_grid = jnp.asarray(rng.normal(size=(u, cpr, D)).astype(np.float32))
    cand = cand_grid.reshape(n, D)
    c2r = jnp.repeat(jnp.arange(u, dtype=jnp.int32), cpr)
    flat = seq.reshape(u * length, D)
    offsets = jnp.arange(u, dtype=jnp.int32) * length
    row = {"L": length, "cands_per_request": cpr, "requests": u, "candidates": n, "k": K,
           "flop_floor": 2.0 * n * length * D,
           "hbm_floor_bytes": float(u * length * D + n * D * 4 + n * K * 8),
           # int8 codes + float32 1/|q| per token, per pass and block (from L2 after the first)
           "kernel_onchip_reread_bytes": float(PASSES * (n // config.block_c) * length * (D + 4)),
           "h2d_sequence_bytes_broadcast": float(n * length * D),
           "h2d_sequence_bytes_dedup": float(u * length * D + 2 * u * 4),
           "impls": {}}
    kern = kernel_pipeline(config)
    k_idx, k_sc = kern(flat, offsets, lengths, cand, c2r)
    ref = dedup_pipeline(lax.Precision.HIGHEST)
    r_idx, _ = ref(seq, lengths, cand_grid)
    r_idx = np.asarray(r_idx).reshape(n, K)
    row["kernel_index_rows_equal_reference"] = float(np.mean(np.all(np.asarray(k_idx) == r_idx, axis=1)))
    row["impls"]["kernel"] = time_jax(kern, (flat, offsets, lengths, cand, c2r), repeats)
    for v in variants:   # other tilings (--tune)
        name = variant_name(v)
        try:
            fn = kernel_pipeline(v)
            row["impls"][name] = time_jax(fn, (flat, offsets, lengths, cand, c2r), repeats)
            v_idx, _ = fn(flat, offsets, lengths, cand, c2r)
            row["impls"][name]["index_rows_equal_reference"] = float(
                np.mean(np.all(np.asarray(v_idx) == r_idx, axis=1)))
            print(f"    {name}: {row['impls'][name]['median_us']:.1f} us", flush=True)
        except Exception as exc:  # noqa: BLE001  (a tiling that does not compile / fit)
            row["impls"][name] = {"error": repr(exc)[:300]}
            print(f"    {name}: {exc!r}"[:300], flush=True)
    for step in profile:   # --profile: where the kernel's time goes
        name = f"kernel_stop_after_step{step}"
        row["impls"][name] = time_jax(kernel_pipeline(config, step),
                                      (flat, offsets, lengths, cand, c2r), repeats)
        print(f"    {name}: {row['impls'][name]['median_us']:.1f} us", flush=True)
    if profile:          # the worst case: every block overflows and takes the fallback kernel
        worst = dataclasses.replace(config, survivors=16)
        name = "kernel_forced_fallback"
        fn = kernel_pipeline(worst)
        row["impls"][name] = time_jax(fn, (flat, offsets, lengths, cand, c2r), max(3, repeats // 5))
        w_idx, _ = fn(flat, offsets, lengths, cand, c2r)
        row["impls"][name]["index_rows_equal_reference"] = float(
            np.mean(np.all(np.asarray(w_idx) == r_idx, axis=1)))
        print(f"    {name}: {row['impls'][name]['median_us']:.1f} us", flush=True)
    for name, prec in (("dedup_highest", lax.Precision.HIGHEST), ("dedup_default", lax.Precision.DEFAULT)):
        fn = dedup_pipeline(prec)
        row["impls"][name] = time_jax(fn, (seq, lengths, cand_grid), repeats)
        idx, _ = fn(seq, lengths, cand_grid)
        row["impls"][name]["index_rows_equal_reference"] = float(
            np.mean(np.all(np.asarray(idx).reshape(n, K) == r_idx, axis=1)))
    try:
        seq_b = seq[c2r]                                   # the broadcast layout, built once
        lengths_b = lengths[c2r]
        fn = broadcast_pipeline(lax.Precision.HIGHEST)
        row["impls"]["broadcast"] = time_jax(fn, (seq_b, lengths_b, cand), max(5, repeats // 2))
        del seq_b
    except Exception as exc:  # noqa: BLE001  (out of memory at the largest shapes)
        row["impls"]["broadcast"] = {"error": repr(exc)[:300]}
    t = {k: v.get("median_us") for k, v in row["impls"].items()}
    best_dedup = min(t["dedup_highest"], t["dedup_default"])
    row["speedup_vs_broadcast"] = t["broadcast"] / t["kernel"] if t.get("broadcast") else None
    row["speedup_vs_dedup"] = best_dedup / t["kernel"]
    row["speedup_vs_dedup_exact"] = t["dedup_highest"] / t["kernel"]
    print(f"  L={length:6d} C/req={cpr:5d} U={u:3d}: kernel {t['kernel']:9.1f} us | dedup "
          f"{t['dedup_highest']:9.1f} (default prec {t['dedup_default']:9.1f}) | broadcast "
          f"{t.get('broadcast') or float('nan'):10.1f} | x{row['speedup_vs_dedup']:.2f} vs dedup, "
          f"x{(row['speedup_vs_broadcast'] or float('nan')):.1f} vs broadcast | rows equal "
          f"{row['kernel_index_rows_equal_reference']:.4f}", flush=True)
    return row


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CANDS), figsize=(5 * len(CANDS), 4.2), sharey=True)
    for ax, cpr in zip(np.atleast_1d(axes), CANDS):
        sub = [r for r in rows if r["cands_per_request"] == cpr]
        for name, style in (("kernel", "o-"), ("dedup_highest", "s--"), ("dedup_default", "s:"),
                            ("broadcast", "d-")):
            pts = [(r["L"], r["impls"][name]["median_us"]) for r in sub
                   if "median_us" in r["impls"].get(name, {})]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L_LL")
        ax.set_title(f"{cpr} candidates / request, {N_TOTAL} total, K={K}")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("latency (us)")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tune", action="store_true", help="also time other tilings at each shape")
    ap.add_argument("--profile", action="store_true",
                    help="also time the main kernel stopped after each pass, and the forced fallback")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("bench/nn_search.py needs a GPU")
    _smem.capture_ttir()
    config = NNSearchConfig()
    env = environment()
    result = {"environment": env, "config": config.__dict__, "k": K, "candidates_per_batch": N_TOTAL,
              "timing": f"median of samples of {CALLS} back-to-back calls, compile excluded"}
    shapes = [(10_000, 256)] if args.quick else [(L, c) for L in LENGTHS for c in CANDS]
    # --tune: the design choices and tilings, one knob at a time against the default
    base = NNSearchConfig()
    knobs = ({"scores": "fma"}, {"radix_bits": 2}, {"radix_bits": 4}, {"unroll": 1},
             {"num_stages": 1}, {"block_t": 64}, {"bins": 512}, {"num_warps": 8})
    variants = [dataclasses.replace(base, **kw) for kw in knobs] if args.tune else []
    rows = [run_shape(L, c, args.repeats, config, variants, STOP_AFTER if args.profile else ())
            for L, c in shapes]
    result["rows"] = rows
    # shared memory of the shipped configurations at K = MAX_K (bins and survivor buffer are
    # sized by next_pow2(K): every K in 65..128 compiles to the same buffers, smaller K to smaller)
    seq = jnp.zeros((64, D), jnp.int8)
    args_ = (seq, jnp.zeros((1,), jnp.int32), jnp.full((1,), 64, jnp.int32), jnp.ones((16, D)),
             jnp.zeros((16,), jnp.int32))
    smem_rows = []
    for cfg in (config, dataclasses.replace(config, scores="fma")):
        fn = jax.jit(lambda s, o, ln, c, r, cfg=cfg: nn_search(s, ln, c, r, k=MAX_K, offsets=o,
                                                               impl="pallas_triton", config=cfg))
        smem_rows.append({"config": cfg.__dict__, "k": MAX_K,
                          **_smem.measure(lambda: fn.lower(*args_).compile(), cfg.num_warps,
                                          cfg.num_stages)})
    sm86 = [r.get("sm86", {}).get("shared_bytes") for r in smem_rows]
    sm90 = [r.get("sm90_shared_bytes") for r in smem_rows]
    smem = {"sm86": {"shared_bytes": None if None in sm86 else max(sm86)},
            "sm90_shared_bytes": None if None in sm90 else max(sm90)}
    result["shared_memory"] = {"per_config": smem_rows, **smem}
    head = next(r for r in rows if r["L"] == 10_000 and r["cands_per_request"] == 256)
    result["headline"] = {
        "device": env.get("device"),
        "speedup_vs_broadcast_L10k_N256": head["speedup_vs_broadcast"],
        "speedup_vs_dedup_L10k_N256": head["speedup_vs_dedup"],
        "speedup_vs_dedup_exact_precision_L10k_N256": head["speedup_vs_dedup_exact"],
        "max_smem_bytes_sm86": smem.get("sm86", {}).get("shared_bytes"),
        "smem_bytes_sm90_triton_report": smem.get("sm90_shared_bytes"),
        "a10g_budget_bytes": A10G_SMEM_BYTES,
        "kernel_us_L10k_N256": head["impls"]["kernel"]["median_us"],
        "h2d_sequence_bytes_ratio_L10k_N256": head["h2d_sequence_bytes_broadcast"] / head["h2d_sequence_bytes_dedup"],
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "nn_search.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    lines = ["# NN search: fused kernel vs XLA pipelines", "",
             f"Device {env.get('device')}; K = {K}; {N_TOTAL} candidates per batch; {result['timing']}.", "",
             "| L_LL | cand/req | kernel (us) | dedup exact (us) | dedup TF32 (us) | broadcast (us) "
             "| vs broadcast | vs best dedup | rows equal ref |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = {k: v.get("median_us", float("nan")) for k, v in r["impls"].items()}
        lines.append(f"| {r['L']} | {r['cands_per_request']} | {t['kernel']:.1f} | {t['dedup_highest']:.1f} "
                     f"| {t['dedup_default']:.1f} | {t.get('broadcast', float('nan')):.1f} "
                     f"| {r['speedup_vs_broadcast'] or float('nan'):.1f}x | {r['speedup_vs_dedup']:.2f}x "
                     f"| {r['kernel_index_rows_equal_reference']:.4f} |")
    lines += ["", f"Shared memory: {json.dumps(result['shared_memory'])}", "",
              f"Headline: {json.dumps(result['headline'])}"]
    with open(os.path.join(args.results, "nn_search.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(args.results, "nn_search.png"))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
