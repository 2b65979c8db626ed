"""Issue #9's table from run files: baseline, the paper's ELF and one chosen ELF setting per model, with the gain and
whether the mean ± std intervals are apart (the issue's target: +3 points, intervals that do not overlap).

    python benchmarks/cross_arch_table.py benchmarks/results/gpu-cross-arch-dm --best adapt-sbn-align

``--standings FILE ...`` instead reads each model's cells from the studies a TOML file names, one table per file
(one synthetic set each; each model's setting is chosen on validation data in its own study; the cells are test
accuracies: a run's ``test_accuracy`` from ``also_test``, or its ``accuracy`` where the study measured on the test
split), and names each cell's machine:

    python benchmarks/cross_arch_table.py --standings benchmarks/standings.toml benchmarks/standings_dsa.toml

With ``--update FILE ...`` the tables replace the text between the lines ``<!-- standings: begin -->`` and
``<!-- standings: end -->`` in each FILE (README.md, BENCHMARKS.md) instead of being printed; the tests check that
the committed files hold what the committed runs give.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

import numpy as np


Key = tuple[str, str, str]  # (set, model, variant)


Runs = dict[Key, list[tuple[Path, dict[str, Any]]]]


def read_runs(study: Path) -> Runs:
    """``(set, model, variant) -> [(file, record), ...]`` of a study's finished runs."""
    runs: Runs = {}
    for f in sorted((study / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        run = r.get("run") or {}
        runs.setdefault((run.get("set"), run.get("model"), run.get("variant")), []).append((f, r))
    return runs


def load_cells(study: Path) -> dict[Key, Cell]:
    """``(set, model, variant) -> Cell`` of a study's runs (test accuracies), each cell read by :func:`load_cell`
    (a failed run, a validation-only run or a stale run stops the table); not-applicable cells are left out."""
    runs = read_runs(study)
    check = study_check(study, Path(__file__).resolve().parent)
    def reported(recs: list[tuple[Path, dict[str, Any]]]) -> bool:  # a record of a current seed that is applicable
        now = [r for _, r in recs if check is None or (r.get("run") or {}).get("seed") in check.seeds]
        return any(not r.get("not_applicable") for r in now)

    return {key: load_cell(study, *key, runs, check) for key, recs in runs.items() if reported(recs)}


def apart(a: list[float], b: list[float]) -> bool:
    """True when the interval mean ± std of ``a`` lies wholly above that of ``b``."""
    return float(np.mean(a) - np.std(a)) > float(np.mean(b) + np.std(b))


def separated(a: list[float], b: list[float]) -> bool:
    """True when the two mean ± std intervals do not overlap (either above the other)."""
    return apart(a, b) or apart(b, a)


def target(best: list[float], baseline: list[float]) -> tuple[float, str]:
    """The gain of ``best`` over ``baseline`` and whether it meets the issue's target (+3, intervals apart)."""
    gain = float(np.mean(best) - np.mean(baseline))
    return gain, "yes" if gain >= 3 and apart(best, baseline) else "no"


def table(cells: dict[Key, Cell], best: str, baseline: str = "baseline", official: str = "elf") -> str:
    """Markdown: set | model | baseline | official ELF | best | gain | target met | best vs official; each cell with
    its machine and run count, gains as differences of the printed means."""
    rows = ["| set | model | baseline (test) | ELF (paper) | " + best + " | gain; +3 and apart? | vs paper's ELF |",
            "|---|---|---|---|---|---|---|"]
    for s, m in dict.fromkeys((k[0], k[1]) for k in cells):
        b, o, e = cells.get((s, m, baseline)), cells.get((s, m, official)), cells.get((s, m, best))
        if not (b and e):
            continue
        rows.append(f"| {s} | {m} | {b} | {o if o else 'n/a'} | {e} | {versus_baseline(e, b)} | "
                    f"{compare(e, o) if o else '-'} |")
    return "\n".join(rows)


@dataclass
class Cell:
    """Test accuracies (%) of one (study, set, model, variant), the machine they ran on, the test-set size and the
    seeds (in the order of ``accuracies``)."""

    accuracies: list[float]
    machine: str
    test_n: int
    seeds: list[int] | None = None
    budget: dict[str, Any] = field(default_factory=dict)  # the protocol's BUDGET fields, equal across the cell's runs
    set_sha256: str = ""

    def __str__(self) -> str:
        n = "" if self.test_n == FULL_TEST else f", {self.test_n} test images"
        return f"{self.machine} {np.mean(self.accuracies):.2f} ± {np.std(self.accuracies):.2f} ({len(self.accuracies)}{n})"


FULL_TEST = 10_000  # CIFAR-10's test split

#: Protocol fields that make a training budget: cells compared in one row must agree on them (the ELF terms may differ)
BUDGET = ("epochs", "extra_epoch", "lr", "momentum", "weight_decay", "batch_size", "lr_decay_epoch", "lr_decay",
          "reset_optimizer_at_decay", "augment", "dsa_mode")


def test_accuracy(record: dict[str, Any]) -> tuple[float, int] | None:
    """``(test accuracy %, test images)`` of one run record, or None when it has none (a validation-only run)."""
    if record.get("test_accuracy") is not None:
        return float(record["test_accuracy"]), int(record.get("test_accuracy_n") or 0)
    if record.get("accuracy") is not None and str(record.get("measured_on", "test")).startswith("test"):
        return float(record["accuracy"]), int(record.get("test_n") or 0)
    return None


def machine(record: dict[str, Any]) -> str:
    env = record.get("environment") or {}
    name = env.get("device_name") or env.get("device") or "?"
    return "CPU" if name == "cpu" else str(name).removeprefix("NVIDIA ")


def load_cell(study: Path, set_name: str, model: str, variant: str, runs: Runs | None = None,
              check: StudyCheck | None = None) -> Cell:
    """The finished runs of ``variant`` for ``model`` on ``set_name`` in ``study`` (a folder with ``runs/``; ``runs``:
    its :func:`read_runs`, when already read). With ``check`` (the study file's seeds and stale runs), records of
    seeds the study no longer has are left out and a stale record stops the table."""
    accs, machines, ns, seeds, budgets, sets = [], set(), set(), [], set(), set()
    for f, r in (read_runs(study) if runs is None else runs).get((set_name, model, variant), []):
        seed = (r.get("run") or {}).get("seed")
        if check is not None and seed not in check.seeds:
            continue  # a leftover of an earlier seed list: not part of the study now
        if check is not None and r.get("run_id") in check.stale:
            raise SystemExit(f"{f}: made with other settings than {check.path.name} asks for now "
                             f"({check.stale[r['run_id']]}); rerun it or restore the study file")
        if r.get("failed"):
            raise SystemExit(f"{f}: the run failed ({str(r['failed']).splitlines()[0][:100]}); a cell with a failed "
                             "run is not reported as if its other seeds were all there")
        got = test_accuracy(r)
        if got is None:
            raise SystemExit(f"{f}: no test accuracy (a validation-only run; the study needs also_test = true)")
        accs.append(got[0])
        ns.add(got[1])
        seeds.append(seed)
        machines.add(machine(r))
        if r.get("protocol"):  # records without one (none committed) are not compared
            budgets.add(json.dumps({k: r["protocol"].get(k) for k in BUDGET}, sort_keys=True))
        if r.get("set_sha256"):  # older records have none: not compared
            sets.add(str(r["set_sha256"]))
    if not accs:
        raise SystemExit(f"{study}: no finished run of {set_name} / {model} / {variant}")
    if len(machines) > 1 or len(ns) > 1 or len(budgets) > 1 or len(sets) > 1:
        raise SystemExit(f"{study}: {set_name} / {model} / {variant} mixes machines {sorted(machines)}, test sizes "
                         f"{sorted(ns)}, training budgets {sorted(budgets)} or set files {sorted(sets)}")
    return Cell(accs, machines.pop(), ns.pop(), seeds, json.loads(budgets.pop()) if budgets else {},
                sets.pop() if sets else "")


@dataclass
class StudyCheck:
    """What the study file behind a results folder asks for now: its seeds, and its stale runs (id -> why)."""

    path: Path
    seeds: set[int]
    stale: dict[str, str]


def study_check(folder: Path, where: Path) -> StudyCheck | None:
    """The :class:`StudyCheck` of the study file in ``where`` whose ``out`` is ``folder``, or None without one."""
    from elf.study import load_config, stale_runs

    for f in sorted(where.glob("*.toml")):
        try:
            out = tomllib.loads(f.read_text()).get("out")
        except tomllib.TOMLDecodeError:
            continue
        if isinstance(out, str) and (where / out).resolve() == folder.resolve():
            cfg = load_config(f)
            return StudyCheck(f, set(cfg.seeds), dict(stale_runs(cfg)))
    return None


def shown_difference(a: list[float], b: list[float]) -> float:
    """The difference of the two means as printed (2 decimals each): the study summaries' rule."""
    from elf.study import printed_difference

    return printed_difference(a, b)


def paired(a: Cell, b: Cell) -> str:
    """A note when two cells were not run on the same seeds (their difference then mixes seed effects)."""
    if a.seeds is None or b.seeds is None or sorted(a.seeds) == sorted(b.seeds):
        return ""
    return f" (seeds differ: {sorted(a.seeds)} vs {sorted(b.seeds)})"


def versus_baseline(a: Cell, base: Cell) -> str:
    """``a``'s gain over ``base`` and whether it meets the target (+3, intervals apart), with machine/seed notes."""
    _, met = target(a.accuracies, base.accuracies)
    other = ("" if a.machine == base.machine else " (machines differ)") + paired(a, base)
    return f"{shown_difference(a.accuracies, base.accuracies):+.2f}; {met}{other}"


def same_budget(a: Cell, b: Cell | None, where: str) -> None:
    """Stop when two cells compared in one row were trained on other sets or with another budget (epochs, lr,
    schedule, batch, augmentation): their difference would not be ELF's."""
    if b is None:
        return
    if a.set_sha256 and b.set_sha256 and a.set_sha256 != b.set_sha256:
        raise SystemExit(f"{where}: the cells compared come from different set files (set_sha256 "
                         f"{a.set_sha256[:12]} vs {b.set_sha256[:12]})")
    if not (a.budget and b.budget):  # a cell of records without a protocol: not compared
        return
    differ = {k: (a.budget.get(k), b.budget.get(k)) for k in BUDGET if a.budget.get(k) != b.budget.get(k)}
    if differ:
        raise SystemExit(f"{where}: the cells compared were trained with another budget: {differ}")


def compare(a: Cell, b: Cell) -> str:
    """``a`` against ``b``: the difference of means, whether the intervals are apart, and whether machines or seeds
    differ."""
    diff = shown_difference(a.accuracies, b.accuracies)
    sep = "apart" if separated(a.accuracies, b.accuracies) else "overlapping"
    return f"{diff:+.2f}, {sep}" + ("" if a.machine == b.machine else " (machines differ)") + paired(a, b)


def standings(spec_path: Path) -> str:
    """Markdown: model | chosen setting | chosen | baseline | gain, target met | ELF (paper) | vs paper, from the
    TOML file ``spec_path`` (``set``, then a ``[models.NAME]`` table per model with ``setting``, ``label``, and
    ``chosen`` / ``baseline`` / ``paper`` as ``"study folder:variant"``, folders relative to the file)."""
    spec = tomllib.loads(spec_path.read_text())
    root = spec_path.parent
    studies: dict[Path, tuple[Runs, StudyCheck | None]] = {}  # each study folder is read (and checked) once

    def cell(model: str, source: str | None) -> Cell | None:
        if not source:
            return None
        folder, _, variant = source.rpartition(":")
        study = root / folder
        if study not in studies:
            studies[study] = (read_runs(study), study_check(study, root))
        runs, check = studies[study]
        return load_cell(study, spec["set"], model, variant, runs, check)

    rows = ["| model | chosen setting | chosen (test) | baseline (test) | gain; +3 and apart? | ELF (paper), test "
            "| chosen vs paper |", "|---|---|---|---|---|---|---|"]
    for model, entry in spec["models"].items():
        chosen, base, paper = (cell(model, entry.get(k)) for k in ("chosen", "baseline", "paper"))
        assert chosen is not None and base is not None, f"{model}: chosen and baseline are required"
        for other in (base, paper):
            same_budget(chosen, other, f"{spec_path.name}: {model}")
        rows.append(f"| {entry.get('label', model)} | {entry['setting']} | {chosen} | {base} | {versus_baseline(chosen, base)} "
                    f"| {paper if paper else 'n/a'} | {compare(chosen, paper) if paper else '-'} |")
    return "\n".join(rows)


BEGIN, END = "<!-- standings: begin -->", "<!-- standings: end -->"


def standings_tables(spec_paths: list[Path]) -> str:
    """Markdown: one :func:`standings` table per spec file (one synthetic set each), each under ``Set: NAME``."""
    def heading(spec: dict[str, Any]) -> str:
        return f"Set: {spec['set']}" + (f" ({spec['about']})" if spec.get("about") else "")

    return "\n\n".join(f"{heading(tomllib.loads(f.read_text()))}\n\n{standings(f)}" for f in spec_paths)


def marked_block(text: str, where: str = "text") -> tuple[int, int]:
    """Start and end offsets of what lies between the :data:`BEGIN` and :data:`END` marker lines of ``text``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{where}: needs one line {BEGIN} and, after it, one line {END} around the standings")
    return text.index(BEGIN) + len(BEGIN) + 1, text.index(END)


def update(path: Path, tables: str) -> bool:
    """Put ``tables`` between the markers of ``path`` (atomically); whether the file changed."""
    from elf.fileio import atomic_write

    text = path.read_text()
    start, end = marked_block(text, str(path))
    new = text[:start] + tables + "\n" + text[end:]
    if new != text:
        atomic_write(path, lambda tmp: Path(tmp).write_text(new))
    return new != text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="*", type=Path, help="study output folders (with runs/)")
    ap.add_argument("--best", help="the variant chosen on validation data")
    ap.add_argument("--standings", type=Path, nargs="+", metavar="FILE",
                    help="TOML files naming each model's cells, one set each (see the module docstring)")
    ap.add_argument("--update", type=Path, nargs="+", metavar="FILE",
                    help="with --standings: write the tables between the standings markers of these files")
    args = ap.parse_args(argv)
    if args.update and not args.standings:
        ap.error("--update needs --standings")
    if args.standings:
        tables = standings_tables(args.standings)
        for path in args.update or []:
            print(f"{path}: {'updated' if update(path, tables) else 'already up to date'}")
        if not args.update:
            print(tables)
        return
    if not args.studies or not args.best:
        ap.error("give study folders and --best, or --standings FILE")
    cells: dict[tuple[str, str, str], list[float]] = {}
    for study in args.studies:
        cells.update(load_cells(study))
    print(table(cells, args.best))


if __name__ == "__main__":
    main()
