"""SKUT benchmark (paper §4.4.3, Tables 5 and 8, Appendix B).

Forward latency and peak device memory of the TransAct V2 encoder (2 layers, d=64, 1 head, FFN 32,
causal + key-padding masks, ragged lengths) in four implementations on the same weights and inputs:

* ``skut``: the fused Pallas kernel (``pallas_kernels.skut.api.skut(..., impl="pallas_triton")``);
* ``xla``: the jitted pure-jnp reference (``skut_reference``);
* ``cudnn``: the same layers with attention by ``jax.nn.dot_product_attention(implementation="cudnn")``
  (causal + per-sequence key lengths, the masks cuDNN takes);
* ``torch``: the paper's baseline, ``torch.nn.TransformerEncoder`` with the memory-efficient SDPA
  backend forced, causal ``mask`` + ``src_key_padding_mask``.

Sweeps L in {64..2048} at B=256 (Table 5) and B in {16..2048} at L=192 (Table 8). Timing: each sample
is 10 back-to-back calls on rotating input sets, synchronized once (``block_until_ready`` / CUDA
synchronize), divided by 10; median, p10, p90 over the samples; compilation excluded. Memory: for JAX,
the compiled executable's arguments + outputs + temporaries (``memory_analysis``); for torch, the
peak allocated bytes during the forward (inputs and weights included, like JAX's arguments).

Shared memory: Triton's reported figure for each shipped SKUT configuration (XLA log
``Shared memory usage``, sm_90a), and the figure for sm_86 (A10G) from compiling the kernel's Triton
IR with the ``triton`` package for ``cuda:86`` where it is installed.

    python bench/skut.py              # full sweep on the GPU machine
    python bench/skut.py --quick      # B=256, L=192 only
    python bench/skut.py --tune       # also sweep SkutConfig at a few shapes

Writes ``bench/results/skut.json``, ``skut.png`` and ``skut.md``.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    import _smem
    _smem.start_log()   # before jax starts: Triton's shared-memory report is an XLA log line

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _smem  # noqa: E402
from _env import RESULTS, environment, stats_us, time_device_calls  # noqa: E402
from pallas_kernels._common import A10G_SMEM_BYTES  # noqa: E402
from pallas_kernels.skut.api import skut  # noqa: E402
from pallas_kernels.skut.config import MAX_RESIDENT_TILES, SkutConfig  # noqa: E402
from pallas_kernels.skut.reference import EncoderWeights, layer_norm, skut_reference  # noqa: E402

D, HEADS, FF, LAYERS = 64, 1, 32, 2
L_SWEEP = (64, 128, 192, 256, 512, 1024, 2048)
B_SWEEP = (16, 32, 64, 128, 256, 512, 1024, 2048)
PAPER_T5 = {64: (59.29, 19.60), 128: (81.58, 10.06), 192: (85.09, 13.24), 256: (84.79, 15.42),
            512: (82.27, 18.12), 1024: (74.85, 15.22), 2048: (73.10, 9.80)}
PAPER_T8 = {16: (60.36, 1.34), 32: (65.96, 3.20), 64: (76.79, 4.45), 128: (82.79, 8.80),
            256: (85.09, 13.24), 512: (86.69, 23.01), 1024: (87.28, 31.47), 2048: (87.79, 38.55)}
CALLS_PER_SAMPLE = 10


def smem_report(configs, dtype) -> list:
    """Triton's shared memory for each (L, config): the sm_90a figure XLA logs, and sm_86."""
    out = []
    key = jax.random.PRNGKey(0)
    w = random_weights(key)
    for length, cfg in configs:
        x = jax.random.normal(key, (2, length, D), dtype)
        mask = jnp.ones((2, length), bool)
        fn = jax.jit(lambda x, m, w, cfg=cfg: skut(x, m, w, impl="pallas_triton", config=cfg))
        row = {"L": length, "config": cfg.__dict__, "dtype": jnp.dtype(dtype).name,
               **_smem.measure(lambda: fn.lower(x, mask, w).compile(), cfg.num_warps, cfg.num_stages)}
        out.append(row)
        print(f"  smem L={length} {cfg}: sm90 {row['sm90_shared_bytes']} B, "
              f"sm86 {row.get('sm86')}", flush=True)
    return out


# ----------------------------------------------------------------------------- implementations
def random_weights(key) -> EncoderWeights:
    """torch-like init (xavier in-projection), fresh per key."""
    ks = jax.random.split(key, 8)
    n = LAYERS

    def u(k, shape, fan_in):
        return jax.random.uniform(k, shape, jnp.float32, -1, 1) / np.sqrt(fan_in)

    return EncoderWeights(
        w_qkv=u(ks[0], (n, D, 3 * D), D), b_qkv=0.1 * u(ks[1], (n, 3 * D), 1),
        w_o=u(ks[2], (n, D, D), D), b_o=0.1 * u(ks[3], (n, D), 1),
        ln1_scale=1 + 0.1 * u(ks[4], (n, D), 1), ln1_bias=0.1 * u(ks[5], (n, D), 1),
        w_1=u(ks[6], (n, D, FF), D), b_1=0.1 * u(ks[7], (n, FF), 1),
        w_2=u(ks[6], (n, FF, D), FF), b_2=0.1 * u(ks[5], (n, D), 1),
        ln2_scale=1 + 0.1 * u(ks[4], (n, D), 1), ln2_bias=0.1 * u(ks[3], (n, D), 1))


def cudnn_encoder(x, lengths, w: EncoderWeights):
    """The encoder with cuDNN flash attention (causal, key lengths); other ops by XLA."""
    b, length, d = x.shape
    cdt = x.dtype
    h = x
    for i in range(w.num_layers):
        qkv = jnp.dot(h, w.w_qkv[i].astype(cdt), preferred_element_type=jnp.float32) + w.b_qkv[i]
        q, k, v = (qkv[..., j * d:(j + 1) * d].astype(cdt).reshape(b, length, 1, d) for j in range(3))
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                         implementation="cudnn").reshape(b, length, d)
        a = jnp.dot(a, w.w_o[i].astype(cdt), preferred_element_type=jnp.float32) + w.b_o[i]
        hid = layer_norm(h.astype(jnp.float32) + a, w.ln1_scale[i], w.ln1_bias[i], 1e-5)
        ff = jax.nn.relu(jnp.dot(hid.astype(cdt), w.w_1[i].astype(cdt),
                                 preferred_element_type=jnp.float32) + w.b_1[i])
        ff = jnp.dot(ff.astype(cdt), w.w_2[i].astype(cdt), preferred_element_type=jnp.float32) + w.b_2[i]
        h = layer_norm(hid + ff, w.ln2_scale[i], w.ln2_bias[i], 1e-5).astype(cdt)
    return h


def torch_encoder(w: EncoderWeights, dtype):
    import torch
    layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="relu",
                                             batch_first=True, norm_first=False)
    enc = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
    sd = {}
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd[p + "self_attn.in_proj_weight"] = np.asarray(w.w_qkv[i]).T
        sd[p + "self_attn.in_proj_bias"] = np.asarray(w.b_qkv[i])
        sd[p + "self_attn.out_proj.weight"] = np.asarray(w.w_o[i]).T
        sd[p + "self_attn.out_proj.bias"] = np.asarray(w.b_o[i])
        sd[p + "linear1.weight"] = np.asarray(w.w_1[i]).T
        sd[p + "linear1.bias"] = np.asarray(w.b_1[i])
        sd[p + "linear2.weight"] = np.asarray(w.w_2[i]).T
        sd[p + "linear2.bias"] = np.asarray(w.b_2[i])
        sd[p + "norm1.weight"] = np.asarray(w.ln1_scale[i])
        sd[p + "norm1.bias"] = np.asarray(w.ln1_bias[i])
        sd[p + "norm2.weight"] = np.asarray(w.ln2_scale[i])
        sd[p + "norm2.bias"] = np.asarray(w.ln2_bias[i])
    enc.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    tdt = {jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16, jnp.float32: torch.float32}
    return enc.to("cuda", tdt[dtype]).eval()


# ----------------------------------------------------------------------------- measurement
def time_jax(fn, inputs, repeats: int) -> dict:
    return time_device_calls(fn, inputs, repeats, CALLS_PER_SAMPLE)


def jax_memory(fn, args) -> int:
    m = fn.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def rel_err(a, ref) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def encoder_flops(batch: int, length: int) -> float:
    """Matmul FLOPs the encoder must do (causal attention counted over the lower triangle)."""
    per_layer = (2 * length * D * 3 * D + 2 * 2 * D * length * (length + 1) / 2
                 + 2 * length * D * D + 2 * 2 * length * D * FF)
    return float(batch * LAYERS * per_layer)


def encoder_bytes(batch: int, length: int, itemsize: int) -> float:
    """Fewest HBM bytes: read x and the mask, write the output."""
    return float(batch * length * (2 * D * itemsize + 1))


def measure_ceilings() -> dict:
    n = 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    t = time_jax(mm, [(a,)], 10)["median_us"] * 1e-6
    big = jnp.ones((256 * 1024 * 1024,), jnp.float32)   # 1 GiB
    cp = jax.jit(lambda x: x * 2.0)
    tb = time_jax(cp, [(big,)], 10)["median_us"] * 1e-6
    return {"bf16_matmul_tflops": 2 * n ** 3 / t / 1e12, "hbm_gb_per_s": 2 * big.nbytes / tb / 1e9}


def run_shape(batch: int, length: int, dtype, configs, repeats: int, torch_ok: bool) -> dict:
    key = jax.random.PRNGKey(batch * 7919 + length)
    w = random_weights(jax.random.fold_in(key, 0))
    inputs = []
    for s in range(3):
        k1, k2 = jax.random.split(jax.random.fold_in(key, s + 1))
        x = jax.random.normal(k1, (batch, length, D), jnp.float32).astype(dtype)
        lengths = jax.random.randint(k2, (batch,), 1, length + 1).at[0].set(length).astype(jnp.int32)
        mask = jnp.arange(length)[None, :] < lengths[:, None]
        inputs.append((x, mask, lengths))
    x0, mask0, len0 = inputs[0]
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(skut_reference)(x0.astype(jnp.float32), mask0, w))
    row = {"B": batch, "L": length, "dtype": jnp.dtype(dtype).name,
           "flops": encoder_flops(batch, length),
           "min_bytes": encoder_bytes(batch, length, jnp.dtype(dtype).itemsize), "impls": {}}

    def record(name, fn, args_list, mem, out):
        t = time_jax(fn, args_list, repeats)
        t["memory_bytes"] = mem
        t["rel_err_vs_f32_reference"] = rel_err(out, ref)
        row["impls"][name] = t
        print(f"  B={batch:5d} L={length:5d} {name:12s} {t['median_us']:9.1f} us "
              f"(p10 {t['p10_us']:.1f}, p90 {t['p90_us']:.1f})  mem {mem / 2**20:8.1f} MiB  "
              f"err {t['rel_err_vs_f32_reference']:.2e}", flush=True)

    for cfg_name, cfg in configs:
        fn = jax.jit(lambda x, m, w, cfg=cfg: skut(x, m, w, impl="pallas_triton", config=cfg))
        args = [(x, m, w) for x, m, _ in inputs]
        record(cfg_name, fn, args, jax_memory(fn, args[0]), fn(*args[0]))
    fn = jax.jit(skut_reference)
    args = [(x, m, w) for x, m, _ in inputs]
    record("xla", fn, args, jax_memory(fn, args[0]), fn(*args[0]))
    if jnp.dtype(dtype) != jnp.float32:
        try:
            fn = jax.jit(cudnn_encoder)
            args = [(x, ln, w) for x, _, ln in inputs]
            record("cudnn", fn, args, jax_memory(fn, args[0]), fn(*args[0]))
        except Exception as exc:  # noqa: BLE001
            row["impls"]["cudnn"] = {"error": repr(exc)[:400]}
    if torch_ok:
        row["impls"]["torch"] = run_torch(w, inputs, dtype, ref, repeats)
        t = row["impls"]["torch"]
        print(f"  B={batch:5d} L={length:5d} {'torch':12s} {t['median_us']:9.1f} us "
              f"(p10 {t['p10_us']:.1f}, p90 {t['p90_us']:.1f})  mem {t['memory_bytes'] / 2**20:8.1f} MiB"
              f"  err {t['rel_err_vs_f32_reference']:.2e}", flush=True)
    return row


def run_torch(w, inputs, dtype, ref, repeats: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    enc = torch_encoder(w, dtype)
    length = inputs[0][0].shape[1]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length, device="cuda",
                                                                  dtype=next(enc.parameters()).dtype)
    tin = []
    for x, mask, _ in inputs:
        tx = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", next(enc.parameters()).dtype)
        tpad = torch.from_numpy(~np.asarray(mask)).to("cuda")
        tin.append((tx, tpad))

    def fwd(tx, tpad):
        return enc(tx, mask=causal, src_key_padding_mask=tpad, is_causal=True)

    with torch.inference_mode(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = fwd(*tin[0]).float().cpu().numpy()
        for args in tin:
            fwd(*args)
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for c in range(CALLS_PER_SAMPLE):
                fwd(*tin[c % len(tin)])
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) / CALLS_PER_SAMPLE)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd(*tin[0])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        # inputs/weights of the other two input sets do not count (JAX counts one set)
        extra = sum(t.numel() * t.element_size() for args in tin[1:] for t in args)
    t = stats_us(samples)
    t["memory_bytes"] = int(peak - extra)
    t["rel_err_vs_f32_reference"] = rel_err(out, ref)
    torch.cuda.empty_cache()
    return t


# ----------------------------------------------------------------------------- report
def speedups(row) -> dict:
    impls = row["impls"]
    s = impls.get("skut", {}).get("median_us")
    out = {}
    for base in ("torch", "xla", "cudnn"):
        b = impls.get(base, {})
        if s and b.get("median_us"):
            out[f"speedup_vs_{base}"] = b["median_us"] / s
            out[f"latency_decrease_vs_{base}_pct"] = 100 * (1 - s / b["median_us"])
            out[f"memory_decrease_vs_{base}_pct"] = 100 * (1 - impls["skut"]["memory_bytes"]
                                                          / b["memory_bytes"])
    return out


def paper_table(rows, key, paper, label) -> str:
    lines = [f"| {label} | SKUT (us) | torch (us) | latency decrease | paper | memory decrease | paper "
             "| vs xla | vs cudnn |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        sp = r["speedups"]
        if "speedup_vs_torch" not in sp:
            continue
        pl_, pm = paper[r[key]]
        lines.append(
            f"| {r[key]} | {r['impls']['skut']['median_us']:.1f} | {r['impls']['torch']['median_us']:.1f} "
            f"| -{sp['latency_decrease_vs_torch_pct']:.2f}% ({sp['speedup_vs_torch']:.1f}x) | -{pl_}% "
            f"| {-sp['memory_decrease_vs_torch_pct']:+.2f}% | -{pm}% "
            f"| {sp.get('speedup_vs_xla', float('nan')):.1f}x | {sp.get('speedup_vs_cudnn', float('nan')):.1f}x |")
    return "\n".join(lines)


def plot(rows_l, rows_b, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, rows, key, title in ((axes[0], rows_l, "L", "B = 256 (Table 5)"),
                                 (axes[1], rows_b, "B", "L = 192 (Table 8)")):
        for name, style in (("skut", "o-"), ("xla", "s--"), ("cudnn", "^--"), ("torch", "d-")):
            pts = [(r[key], r["impls"][name]["median_us"]) for r in rows
                   if "median_us" in r["impls"].get(name, {})]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("forward latency (us)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("TransAct V2 encoder forward (2 layers, d=64, bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only B=256, L=192")
    ap.add_argument("--tune", action="store_true", help="sweep SkutConfig at a few shapes first")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--smem-only", action="store_true",
                    help="re-measure only the shared memory of the shipped configs into an existing skut.json")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype).type
    if jax.default_backend() != "gpu":
        sys.exit("bench/skut.py needs a GPU (the kernel is timed compiled, not interpreted)")
    _smem.capture_ttir()
    if args.smem_only:
        tag = "" if args.dtype == "bfloat16" else f"_{args.dtype}"
        with open(os.path.join(RESULTS, f"skut{tag}.json")) as fh:
            result = json.load(fh)
        add_shared_memory(result)
        write_outputs(result, args)
        return
    try:
        import torch
        torch_ok = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        torch_ok = False
    env = environment()
    if torch_ok:
        env["torch"] = torch.__version__
        env["torch_cuda_device"] = torch.cuda.get_device_name(0)
    result = {"environment": env, "shapes": {"d_model": D, "heads": HEADS, "ff": FF, "layers": LAYERS},
              "timing": f"median of {args.repeats} samples, each {CALLS_PER_SAMPLE} back-to-back calls "
                        "on 3 rotating input sets / 10; compile excluded"}
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    result["ceilings"] = measure_ceilings()
    print(f"ceilings: {result['ceilings']}", flush=True)

    if args.tune:
        tune = []
        for batch, length in ((256, 64), (256, 192), (256, 512), (256, 2048), (16, 192)):
            cands = []
            for block in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2):
                        for resident in (True, False):
                            if resident and stages > 1:
                                continue   # the resident variant has no loop to pipeline
                            cfg = SkutConfig(block, block, warps, stages, resident)
                            if resident and -(-length // block) > MAX_RESIDENT_TILES:
                                continue
                            cands.append((f"{block}/{warps}w/{stages}s/{'res' if resident else 'str'}", cfg))
            r = run_shape(batch, length, dtype, cands, max(10, args.repeats // 3), torch_ok=False)
            best = min(((n, v["median_us"]) for n, v in r["impls"].items() if n != "xla"
                        and n != "cudnn" and "median_us" in v), key=lambda t: t[1])
            print(f"  best at B={batch} L={length}: {best}", flush=True)
            tune.append({**r, "best": best})
        result["tune"] = tune

    shapes_l = [(256, L) for L in ((192,) if args.quick else L_SWEEP)]
    shapes_b = [] if args.quick else [(b, 192) for b in B_SWEEP]
    rows_l, rows_b = [], []
    for rows, shapes in ((rows_l, shapes_l), (rows_b, shapes_b)):
        for batch, length in shapes:
            existing = [r for r in rows_l if r["B"] == batch and r["L"] == length]
            if existing:
                rows.append(existing[0])
                continue
            r = run_shape(batch, length, dtype, [("skut", None)], args.repeats, torch_ok)
            r["speedups"] = speedups(r)
            s = r["impls"]["skut"]["median_us"] * 1e-6
            r["skut_tflops"] = r["flops"] / s / 1e12
            r["skut_fraction_of_matmul_peak"] = r["skut_tflops"] / result["ceilings"]["bf16_matmul_tflops"]
            r["skut_fraction_of_hbm_bandwidth"] = (r["min_bytes"] / s / 1e9) / result["ceilings"]["hbm_gb_per_s"]
            r["skut_config"] = SkutConfig.default(length, D, dtype).__dict__
            rows.append(r)
    result["table5_L_sweep_B256"] = rows_l
    result["table8_B_sweep_L192"] = rows_b
    head_row = next(r for r in rows_l if r["L"] == 192)
    sp = head_row["speedups"]
    result["headline"] = {
        "device": env.get("device", jax.devices()[0].device_kind),
        "speedup_vs_torch_B256_L192": sp.get("speedup_vs_torch"),
        "speedup_vs_xla_B256_L192": sp.get("speedup_vs_xla"),
        "speedup_vs_cudnn_B256_L192": sp.get("speedup_vs_cudnn"),
        "memory_decrease_vs_torch_pct_B256_L192": sp.get("memory_decrease_vs_torch_pct"),
        "a10g_budget_bytes": A10G_SMEM_BYTES,
        "skut_fraction_of_bf16_matmul_peak_B256_L192": head_row["skut_fraction_of_matmul_peak"],
        "skut_fraction_of_hbm_bandwidth_B256_L192": head_row["skut_fraction_of_hbm_bandwidth"],
    }
    add_shared_memory(result)
    write_outputs(result, args)


SHIPPED_LENGTHS = (1, 7, 16, 32, 64, 128, 192, 256, 300, 1000, 2048)


def add_shared_memory(result: dict) -> None:
    """Triton's shared memory for every configuration ``SkutConfig.default`` returns (per dtype, at
    the longest L that uses it), into ``result['shared_memory']`` and the headline."""
    smem = []
    print("shared memory of the shipped configurations:", flush=True)
    for dt in (jnp.float32, jnp.bfloat16, jnp.float16):
        longest = {}
        for length in SHIPPED_LENGTHS:
            longest[SkutConfig.default(length, D, dt)] = length
        smem += smem_report([(length, cfg) for cfg, length in longest.items()], dt)
    result["shared_memory"] = smem
    sm86 = [r["sm86"]["shared_bytes"] for r in smem if "shared_bytes" in r.get("sm86", {})]
    sm90 = [r["sm90_shared_bytes"] for r in smem if r["sm90_shared_bytes"] is not None]
    result["headline"]["max_smem_bytes_sm86"] = max(sm86) if len(sm86) == len(smem) else None
    result["headline"]["max_smem_bytes_sm90_triton_report"] = max(sm90) if sm90 else None


def write_outputs(result: dict, args) -> None:
    rows_l, rows_b = result["table5_L_sweep_B256"], result["table8_B_sweep_L192"]
    os.makedirs(args.results, exist_ok=True)
    tag = "" if args.dtype == "bfloat16" else f"_{args.dtype}"
    with open(os.path.join(args.results, f"skut{tag}.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    head = result["headline"]
    md = ["# SKUT vs PyTorch memory-efficient TransformerEncoder", "",
          f"Device: {head['device']}; dtype {args.dtype}; {result['timing']}.", "",
          "## Table 5 (B = 256)", "", paper_table(rows_l, "L", PAPER_T5, "L")]
    if rows_b:
        md += ["", "## Table 8 (L = 192)", "", paper_table(rows_b, "B", PAPER_T8, "B")]
    md += ["", "## Shared memory per block (shipped configurations)", "",
           "| dtype | L | config | sm_86 (B) | sm_90a (B) |", "| --- | --- | --- | --- | --- |"]
    for r in result["shared_memory"]:
        c = r["config"]
        md.append(f"| {r['dtype']} | {r['L']} | {c['block_q']}/{c['block_k']} rows, {c['num_warps']} warps, "
                  f"{c['num_stages']} stages, {'resident' if c['resident'] else 'streaming'} "
                  f"| {r.get('sm86', {}).get('shared_bytes', r.get('sm86'))} | {r['sm90_shared_bytes']} |")
    md += ["", f"Max: {head['max_smem_bytes_sm86']} B (sm_86), {head['max_smem_bytes_sm90_triton_report']} B "
           f"(sm_90a); A10G budget {A10G_SMEM_BYTES} B.", "", f"Headline: {json.dumps(head)}"]
    with open(os.path.join(args.results, f"skut{tag}.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    plot(rows_l, rows_b, os.path.join(args.results, f"skut{tag}.png"))
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
