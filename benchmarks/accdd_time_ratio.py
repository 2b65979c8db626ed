"""Acc-DD's claim as a number: wall time for the early-stage + perturbed pool to reach the random-init pool's accuracy.

Reads the runs of ``cpu_accdd_curve_study.toml`` (sets named ``random-<step>`` and ``early-<step>``, snapshots written
by ``elf distill --snapshot-every``), averages accuracy over seeds per snapshot, and finds the first early-pool
snapshot whose mean accuracy reaches the random pool's final mean. Distillation time is the snapshot's
``distill_wall_time_s``; the pool's one-off training time (``pool_build_time_s``) is reported with and without.

    python benchmarks/accdd_time_ratio.py [--runs benchmarks/results/cpu-accdd-curve/runs] [--out .../time_ratio.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def curves(runs_dir: Path) -> dict[str, list[dict[str, float]]]:
    """``{"random": [...], "early": [...]}``: per snapshot step, mean/std accuracy over seeds and the wall times."""
    acc: dict[tuple[str, int], list[float]] = defaultdict(list)
    meta: dict[tuple[str, int], dict[str, float]] = {}
    for f in sorted(runs_dir.glob("*.json")):
        rec = json.loads(f.read_text())
        pool, _, step = rec["run"]["set"].partition("-")
        key = (pool, int(step))
        acc[key].append(float(rec["accuracy"]))
        d = rec["data"]
        meta[key] = {"distill_s": float(d["distill_wall_time_s"]), "pool_s": float(d.get("pool_build_time_s", 0.0)),
                     "snapshot_step": int(d["snapshot_step"])}
    out: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (pool, step), a in sorted(acc.items()):
        assert meta[(pool, step)]["snapshot_step"] == step, f"set {pool}-{step} holds another snapshot"
        out[pool].append({"step": step, "mean": float(np.mean(a)), "std": float(np.std(a)), "seeds": len(a),
                          **meta[(pool, step)]})
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=HERE / "results/cpu-accdd-curve/runs")
    ap.add_argument("--out", type=Path, default=HERE / "results/cpu-accdd-curve/time_ratio.json")
    args = ap.parse_args(argv)
    c = curves(args.runs)
    target = c["random"][-1]
    hit = next((p for p in c["early"] if p["mean"] >= target["mean"]), None)
    result: dict[str, object] = {"curves": c, "target": target, "early_reaches_target": hit is not None}
    print("| pool | image updates | distill time (s) | accuracy |")
    print("|---|---|---|---|")
    for pool in ("random", "early"):
        for p in c[pool]:
            print(f"| {pool} | {p['step']} | {p['distill_s']:.0f} | {p['mean']:.2f} ± {p['std']:.2f} |")
    if hit is not None:
        result["time_ratio_distill_only"] = hit["distill_s"] / target["distill_s"]
        result["time_ratio_with_pool"] = (hit["distill_s"] + hit["pool_s"]) / (target["distill_s"] + target["pool_s"])
        print(f"\nearly pool reaches {target['mean']:.2f} (random pool, {target['step']} updates) after {hit['step']} updates: "
              f"time ratio {result['time_ratio_distill_only']:.2f} (distillation only), "
              f"{result['time_ratio_with_pool']:.2f} (with the pool's {hit['pool_s']:.0f} s of training)")
    else:
        print(f"\nthe early pool does not reach the random pool's final {target['mean']:.2f} within its "
              f"{c['early'][-1]['step']} updates")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
