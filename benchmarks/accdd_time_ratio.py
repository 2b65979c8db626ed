"""Acc-DD's claim as a number: wall time for the early-stage + perturbed pool to reach the random-init pool's accuracy.

Reads the runs of ``cpu_accdd_curve_study.toml`` (sets named ``<pool>-<step>``, snapshots written by
``elf distill --snapshot-every``), averages accuracy over seeds per snapshot, and finds for every pool other than
``random`` the first snapshot whose mean accuracy reaches the ``random`` pool's final mean. Distillation time is the snapshot's
``distill_wall_time_s``; the pool's one-off training time (``pool_build_time_s``) is reported with and without.

    python benchmarks/accdd_time_ratio.py [--runs .../cpu-accdd-curve/runs] [--out .../time_ratio.json] [--pool-seconds early1=177.3]
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
    ap.add_argument("--pool-seconds", action="append", default=[], metavar="POOL=S",
                    help="pool training time for a pool whose sets loaded it from the cache (their metadata says 0)")
    args = ap.parse_args(argv)
    c = curves(args.runs)
    for item in args.pool_seconds:
        name, _, secs = item.partition("=")
        for p in c[name]:
            p["pool_s"] = float(secs)
    target = c["random"][-1]
    result: dict[str, object] = {"curves": c, "target": target}
    print("| pool | image updates | distill time (s) | accuracy |")
    print("|---|---|---|---|")
    for pool, points in c.items():
        for p in points:
            print(f"| {pool} | {p['step']} | {p['distill_s']:.0f} | {p['mean']:.2f} ± {p['std']:.2f} |")
    print()
    for pool, points in c.items():
        if pool == "random":
            continue
        hit = next((p for p in points if p["mean"] >= target["mean"]), None)
        entry: dict[str, object] = {"reaches_target": hit is not None}
        if hit is not None:
            entry["step"] = hit["step"]
            entry["time_ratio_distill_only"] = hit["distill_s"] / target["distill_s"]
            entry["time_ratio_with_pool"] = (hit["distill_s"] + hit["pool_s"]) / (target["distill_s"] + target["pool_s"])
            print(f"{pool}: reaches {target['mean']:.2f} (random pool, {target['step']} updates) after {hit['step']} updates: "
                  f"time ratio {entry['time_ratio_distill_only']:.2f} (distillation only), "
                  f"{entry['time_ratio_with_pool']:.2f} (with the pool's {hit['pool_s']:.0f} s of training)")
        else:
            print(f"{pool}: does not reach the random pool's final {target['mean']:.2f} within {points[-1]['step']} updates")
        result[pool] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
