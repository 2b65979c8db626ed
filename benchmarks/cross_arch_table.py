"""Issue #9's table from a study's run files: baseline, the paper's ELF and one chosen ELF setting per model, with the
gain and whether the mean ± std intervals are apart (the issue's target: +3 points, intervals that do not overlap).

    python benchmarks/cross_arch_table.py benchmarks/results/gpu-cross-arch-dm --best adapt-sbn-align
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_cells(study: Path) -> dict[tuple[str, str, str], list[float]]:
    """``(set, model, variant) -> accuracies`` of the finished runs (not-applicable cells left out)."""
    cells: dict[tuple[str, str, str], list[float]] = {}
    for f in sorted((study / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("accuracy") is not None:
            run = r["run"]
            cells.setdefault((run["set"], run["model"], run["variant"]), []).append(float(r["accuracy"]))
    return cells


def apart(a: list[float], b: list[float]) -> bool:
    """True when the interval mean ± std of ``a`` lies wholly above that of ``b``."""
    return float(np.mean(a) - np.std(a)) > float(np.mean(b) + np.std(b))


def table(cells: dict[tuple[str, str, str], list[float]], best: str, baseline: str = "baseline", official: str = "elf") -> str:
    """Markdown: set | model | baseline | official ELF | best | gain | target met | best vs official."""

    def fmt(xs: list[float] | None) -> str:
        return f"{np.mean(xs):.2f} ± {np.std(xs):.2f}" if xs else "n/a"

    rows = ["| set | model | baseline | ELF (paper) | " + best + " | gain | +3 and apart | vs paper's ELF |",
            "|---|---|---|---|---|---|---|---|"]
    for s, m in dict.fromkeys((k[0], k[1]) for k in cells):
        b, o, e = cells.get((s, m, baseline)), cells.get((s, m, official)), cells.get((s, m, best))
        if not (b and e):
            continue
        gain = float(np.mean(e) - np.mean(b))
        met = "yes" if gain >= 3 and apart(e, b) else "no"
        vs = "-" if not o else (f"{np.mean(e) - np.mean(o):+.2f}" + (" (apart)" if apart(e, o) or apart(o, e) else ""))
        rows.append(f"| {s} | {m} | {fmt(b)} | {fmt(o)} | {fmt(e)} | {gain:+.2f} | {met} | {vs} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+", type=Path, help="study output folders (with runs/)")
    ap.add_argument("--best", required=True, help="the variant chosen on validation data")
    args = ap.parse_args(argv)
    cells: dict[tuple[str, str, str], list[float]] = {}
    for study in args.studies:
        cells.update(load_cells(study))
    print(table(cells, args.best))


if __name__ == "__main__":
    main()
