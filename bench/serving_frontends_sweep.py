"""Which front-end setup serves the most? A sweep of ``bench/serving.py --frontends`` settings, then
the full measurement with the best one.

    python bench/serving_frontends_sweep.py                     # GPU machine, ~7 minutes
    python bench/serving_frontends_sweep.py --quick             # CPU smoke run

Each setting (front-end processes, requests per part, part wait, pipeline depth, busy wait, the
interpreter's switch interval) runs ``bench/serving.py`` in a fresh process with the max-rate
search only (batch ``--batch``), one after the other on the same machine, so their max sustainable
rates compare side by side; ``one`` is the one-process engine (no front ends) as the reference. Then
the best setting runs ``bench/serving.py`` again with the device-only capacity, the search, the
phases at the max rate and the 2x overload point, writing ``serving.{json,png}`` to ``--out``.
Compiled programs are shared through a persistent compilation cache.

Writes ``serving_frontends_sweep.json`` (every setting's search, the ratio to ``one``, the best)
next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> serving.py arguments; "one" is the reference (no front ends).
FE6 = ["--frontends", "6", "--part-requests", "8", "--part-wait-ms", "2"]
SWITCH = ["--switch-interval-us", "500"]
SETTINGS: Dict[str, List[str]] = {
    "one": [],
    "fe6_part8_wait2": FE6,
    "fe6_part8_wait2_switch500": FE6 + SWITCH,
    "fe6_part8_wait2_switch500_depth4": FE6 + SWITCH + ["--pipeline-depth", "4"],
    "fe4_part16_wait3_switch500_depth4_busy4": [
        "--frontends", "4", "--part-requests", "16", "--part-wait-ms", "3", "--pipeline-depth", "4",
        "--busy-wait-ms", "4"] + SWITCH,
}
SEARCH_ONLY = "device_only,phases,timeline,overload,cost_growth,grid"


def run(args: List[str], out: str, timeout: float, env: dict) -> Optional[dict]:
    """One ``bench/serving.py`` run; its JSON, or None if it wrote none."""
    cmd = [sys.executable, os.path.join(HERE, "serving.py"), "--out", out] + args
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    try:
        subprocess.run(cmd, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        print(f"  cut at {timeout:.0f} s", flush=True)
    path = os.path.join(out, "serving_quick.json" if "--quick" in args else "serving.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    result["_wall_s"] = time.monotonic() - t0
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="names from SETTINGS, in order")
    ap.add_argument("--batch", type=int, default=2048, help="max candidates per batch")
    ap.add_argument("--search-start", type=float, default=200_000)
    ap.add_argument("--search-steps", type=int, default=5)
    ap.add_argument("--setting-s", type=float, default=75, help="time box of each sweep run")
    ap.add_argument("--final-s", type=float, default=170, help="time box of the final run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny L, --quick serving runs)")
    a = ap.parse_args(argv)
    names = [n for n in a.settings.split(",") if n]
    for n in names:
        if n not in SETTINGS:
            ap.error(f"--settings: unknown {n!r}; choose from {list(SETTINGS)}")
    common = ["--search-batch-sizes", str(a.batch)]
    if a.quick:
        common = ["--quick", "--search-batch-sizes", "32"]
        a.search_start, a.search_steps = 800, 2
        if a.out == os.path.join(HERE, "results"):
            a.out = tempfile.mkdtemp(prefix="serving_sweep_")
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="serving_sweep_cache_"))
    scratch = tempfile.mkdtemp(prefix="serving_sweep_runs_")
    sweep = {"benchmark": "serving_frontends_sweep", "batch": a.batch, "settings": {}, "best": None}
    for name in names:
        r = run(common + SETTINGS[name] + ["--skip", SEARCH_ONLY, "--search-start", str(a.search_start),
                                           "--search-steps", str(a.search_steps),
                                           "--max-total-s", str(a.setting_s - 5)],
                os.path.join(scratch, name), a.setting_s + 30, env)
        search = (r or {}).get("search") or {}
        sweep["settings"][name] = {
            "args": SETTINGS[name], "max_candidates_per_s_p99_20ms": search.get("max_candidates_per_s"),
            "trials": [{k: t.get(k) for k in ("offered_candidates_per_s", "achieved_candidates_per_s",
                                              "e2e_ms", "mean_batch_candidates", "cpu_cores_used",
                                              "cpu_cores_used_engine_process", "sustained")}
                       for t in search.get("trials", [])],
            "environment": (r or {}).get("environment"), "errors": (r or {}).get("errors")}
        print(f"== {name}: {search.get('max_candidates_per_s')}", flush=True)
    rates = {n: s["max_candidates_per_s_p99_20ms"] or 0.0 for n, s in sweep["settings"].items()}
    ref = rates.get("one") or None
    for n, s in sweep["settings"].items():
        s["ratio_to_one_process"] = rates[n] / ref if ref else None
    fronts = {n: v for n, v in rates.items() if n != "one"}
    best = max(fronts, key=fronts.get) if fronts else None
    sweep["best"] = best
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "serving_frontends_sweep.json")

    def save():
        with open(path, "w") as f:
            json.dump(sweep, f, indent=1)

    save()
    if best and fronts[best] > 0:
        final = run(common + SETTINGS[best] + ["--skip", "cost_growth,grid",
                                              "--search-start", str(0.9 * fronts[best]),
                                              "--max-total-s", str(a.final_s - 5)],
                    a.out, a.final_s + 60, env)
        sweep["final"] = {"setting": best, "headline": (final or {}).get("headline")}
        save()
    print(json.dumps({n: s["max_candidates_per_s_p99_20ms"] for n, s in sweep["settings"].items()},
                     indent=1))
    print(f"best: {best}; wrote {path}")
    return sweep


if __name__ == "__main__":
    main()
