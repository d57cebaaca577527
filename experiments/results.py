"""Writes ``docs/results.md``, the one place every measured figure of the project is stated, from the
files that hold them:

* ``a2ijax/models/<name>/report.json`` and ``meta.json``: the shipped models' test-split errors per
  state point and the commands that made them;
* ``docs/data/*.json``: the experiments' own output files, copied there when they are recorded
  (``md_memory.json`` from ``experiments/md_memory.py``, ``bench.json`` from ``a2ijax bench``,
  ``lammps_speed.json`` from ``experiments/lammps_speed.py``, ``fresh_clone.json`` the README's two
  commands timed in a fresh clone, ``notebooks_full.json`` from ``experiments/notebooks_full.py``, ...),
  each with its command, date and
  machine, and a ``recorded`` note (free CPU or not, by whom it was copied).

    python experiments/results.py            # rewrite docs/results.md
    python experiments/results.py --check    # exit 1 if docs/results.md is out of date

``tests/test_results.py`` runs the check: a figure changed in its source but not in the document
(or the reverse) fails the suite. Other documents link here instead of repeating numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "a2ijax" / "models"
DATA = ROOT / "docs" / "data"
OUT = ROOT / "docs" / "results.md"


def load(name: str) -> dict | None:
    path = DATA / name
    return json.loads(path.read_text()) if path.is_file() else None


def section(source: str) -> Callable[[Callable[[dict], list[str]]], Callable[[], list[str]]]:
    """A section of results.md rendered from ``docs/data/<source>``: none while the file is absent,
    followed by a blank line."""
    def wrap(render: Callable[[dict], list[str]]) -> Callable[[], list[str]]:
        def lines() -> list[str]:
            data = load(source)
            return [] if data is None else render(data) + [""]
        return lines
    return wrap


def provenance(data: dict) -> str:
    machine = data.get("machine_note", data.get("machine", ""))
    return f"`{data.get('command', '?')}`, {data.get('date', '?')}, {machine}; {data.get('recorded', '')}".rstrip("; ")


def table(columns: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table: ``columns``, one alignment mark per column (``l`` or ``r``), ``rows`` of cells."""
    marks = "".join("---|" if a == "l" else "---:|" for a in align)
    return ["| " + " | ".join(columns) + " |", "|" + marks] + ["| " + " | ".join(row) + " |" for row in rows]


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def accuracy() -> list[str]:
    lines = ["## Shipped models: errors on the test split", "",
             "Per state point: the total-energy RMSE over the MD total-energy fluctuation and the force RMSE "
             "over the force std (the paper's measure), from each model's `report.json`; the per-atom energy "
             "correlation with the exact decomposition where the reference has one.", ""]
    for path in sorted(MODELS.glob("*/report.json")):
        name = path.parent.name
        report = json.loads(path.read_text())
        meta = json.loads((path.parent / "meta.json").read_text())
        points = report["state_points"]
        lines += [f"### `{name}`", "", f"{report['step']:,} training steps; made by `" + "`, `".join(meta["commands"])
                  + f"`; {report['frames']} test frames, {report['parameters']:,} parameters.", "",
                  "| state point | frames | energy RMSE | energy fluctuation | energy ratio | force RMSE | force std "
                  "| force ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for point, row in points.items():
            lines.append(f"| {point} | {row['frames']} | {row['energy_rmse']:.4g} | {row['energy_fluctuation']:.4g} | "
                         f"{percent(row['energy_ratio'])} | {row['force_rmse']:.4g} | {row['force_std']:.4g} | "
                         f"{percent(row['force_ratio'])} |")
        worst_e = max(points.values(), key=lambda r: r["energy_ratio"])["energy_ratio"]
        worst_f = max(points.values(), key=lambda r: r["force_ratio"])["force_ratio"]
        per_atom = report.get("per_atom_energy", {})
        pearson = f"; per-atom energy Pearson r {per_atom['pearson']:.3f}" if "pearson" in per_atom else ""
        if "pearson_gauge_fixed" in per_atom:  # several species: each one's offset is not fixed by totals
            pearson += f" ({per_atom['pearson_gauge_fixed']:.3f} with each species' mean offset removed)"
        lines += ["", f"Worst state point: energy {percent(worst_e)}, force {percent(worst_f)}{pearson}.", ""]
    return lines


@section("md_memory.json")
def md_memory(data: dict) -> list[str]:
    lines = ["## MD at scale: memory and time per atom-step", "",
             f"The shipped `{data['model']}` model through `Checkpoint.potential(box)` and `a2ijax.md.run` (NVE, "
             f"LJ liquid at density {data['density']}, float32, one process). {provenance(data)}.", "",
             "| N | K | M | cell list | allocate s | first chunk s (compiles) | us/atom-step | peak RSS MiB "
             "| above the interpreter, KiB/atom | added per atom, KiB |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "failed" in r:
            lines.append(f"| {r['n']:,} | failed: {r['failed']} |||||||||")
            continue
        added = r.get("marginal_kib_per_atom")
        cells = "yes" if r["cell_list"] else "no"
        lines.append(f"| {r['n']:,} | {r['K']} | {r['M']} | {cells} | {r['allocate_s']:.1f} | "
                     f"{r['first_chunk_s']:.1f} | {r['us_per_atom_step']:.1f} | {r['peak_mib']:,.0f} | "
                     f"{r['kib_per_atom']:.2f} | {'' if added is None else f'{added:.2f}'} |")
    ratio = data.get("ratio_to_1e4")
    if ratio:
        lines += ["", f"At {ratio['n']:,} atoms over 10,000: time per atom-step x{ratio['us_per_atom_step']:.2f}, "
                  f"memory per atom above the interpreter x{ratio['kib_per_atom']:.2f}."]
    return lines


@section("bench.json")
def bench(data: dict) -> list[str]:
    env = data["environment"]
    lines = ["## Speed: `a2ijax bench`", "",
             f"{env['backend']} ({env['device']}), {env['dtype']}, jax {env['jax']}, jax-md {env['jax_md']}; "
             f"measured matmul rate {env['matmul_flop_per_s'] / 1e9:.4g} GFLOP/s. {provenance(dict(env, **data))}. "
             "Every row is stepped by `a2ijax.md.run` in its own process; the shipped models run on their own "
             "systems (x LJ is a ratio of cost per atom-step, not of like jobs).", "",
             "| potential | kind | system | params | N | list | K | M | atom-steps/s | us/atom-step | x jax-md LJ "
             "| E+F MFLOP/atom | peak RSS MiB |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    lj = {r["n"]: r["us_per_atom_step"] for r in data["rows"] if r["potential"] == "lj"}
    for r in data["rows"]:
        base = next((v for n, v in lj.items() if abs(n - r["n"]) <= 0.2 * r["n"]), None)
        ratio = "" if base is None else f"{r['us_per_atom_step'] / base:.3g}"
        keys = "" if r["attention_keys"] is None else str(r["attention_keys"])
        rss = "" if r["host_peak_rss_mib"] is None else f"{r['host_peak_rss_mib']:,.0f}"
        lines.append(f"| {r['potential']} | {r['kind']} | {r['system']} | {r['parameters']:,} | {r['n']:,} | "
                     f"{r['neighbor_list']} | {r['neighbors']} | {keys} | {r['atom_steps_per_s']:.4g} | "
                     f"{r['us_per_atom_step']:.3g} | {ratio} | {r['force_flop_per_atom'] / 1e6:.3g} | {rss} |")
    for s in data["skipped"]:
        lines.append(f"\nNot measured: {s['potential']} at N {s['n']}: {s['reason']}")
    return lines


@section("lammps_speed.json")
def lammps(data: dict) -> list[str]:
    lines = ["## LAMMPS + A2I against `a2ijax md`", "",
             f"The shipped `{data['model']}` model, LJ liquid at density 0.84, NVE, float32; {provenance(data)}. "
             "`a2ijax md`: the model through `Checkpoint.potential` and `md.run`, on the package's periodic cell "
             "list; LAMMPS through `fix external` (`a2ijax.lammps`), whose callback finds neighbours with a host "
             "cell list, on 1 and 2 MPI ranks of this machine's "
             f"{data.get('cores', '?')} cores. A step's time: `a2ijax md` between two compiled chunks, LAMMPS from "
             "the `run` command's setup to its last step; the whole `run`, setup included, beside it. The rank-0 "
             "columns cover the timed steps: centres evaluated per local atom (the ghost recomputation), the "
             "callback's host time (neighbours, padding) and model time, and how many calls rebuilt the layout "
             "or compiled.", "",
             "| engine | ranks | N | us/atom-step | x a2ijax md | whole run, us/atom-step | rank 0: centres per local "
             "atom | host s | model s | layouts / compiles |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        if "failed" in r:
            lines.append(f"| {r['engine']} | | {r['n']:,} | failed: {r['failed']} ||||||")
            continue

        def cell(key: str, form: str, r: dict = r) -> str:
            return "" if key not in r else format(r[key], form)

        counts = f"{r['rank0_layouts']} / {r['rank0_compiled']}" if "rank0_layouts" in r else ""
        lines.append(f"| {r['engine']} | {r['ranks']} | {r['n']:,} | {r['us_per_atom_step']:.1f} | "
                     f"{r.get('over_a2ijax_md', 1.0):.2f} | {cell('run_us_per_atom_step', '.1f')} | "
                     f"{cell('rank0_centres_per_local', '.2f')} | {cell('rank0_host_s', '.1f')} | "
                     f"{cell('rank0_model_s', '.1f')} | {counts} |")
    return lines


@section("md_checks.json")
def md_checks(data: dict) -> list[str]:
    steps = {r["nve"]["model"]["steps"] for r in data["rows"]}
    lines = ["## MD with the shipped models against the reference potentials", "",
             f"{', '.join(f'{n:,}' for n in sorted(steps))} NVE steps from a start equilibrated with the reference "
             "potential, then Langevin NVT for the RDF (the mean over r < L/2 of |g_model - g_ref|, beside the same "
             "between two reference runs: the noise floor). Drift: the slope of the total energy per atom against "
             "time; beside it, the model's drift over the whole run over the largest excursion of the reference's "
             f"own total energy per atom (below 1: the drift is inside the reference integrator's noise). "
             f"{provenance(data)}.", ""]
    rows = []
    for r in data["rows"]:
        model, reference = r["nve"]["model"], r["nve"]["reference"]
        rdf = ", ".join(f"{pair} {d:.3g} / {r['rdf_noise_floor'][pair]:.3g} ({d / r['rdf_noise_floor'][pair]:.2f}x)"
                        for pair, d in r["rdf_difference"].items())
        over_run = abs(model["drift_per_atom_per_time"]) * model["steps"] * r["dt"]
        rows.append([r["system"], r["state_point"], str(r["atoms"]), "yes" if model["finite"] else "no",
                     f"{model['drift_per_atom_per_time']:.2g} / {reference['drift_per_atom_per_time']:.2g}",
                     f"{over_run / reference['max_excursion_per_atom']:.2f}",
                     f"{model['temperature_mean']:.4g} / {reference['temperature_mean']:.4g}", rdf,
                     f"{model['atom_steps_per_s']:,.0f}"])
    return lines + table(["system", "state point", "N", "finite", "drift model / reference", "drift over the run / "
                          "reference's excursion", "kT model / reference", "RDF difference / noise floor",
                          "atom-steps/s"], "llrllrllr", rows)


def compact(value) -> str:
    """A notebook's figures in one line: floats to 3 significant digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {compact(v)}" if not isinstance(v, dict) else f"{k} ({compact(v)})"
                         for k, v in value.items())
    return format(value, ".3g") if isinstance(value, float) else str(value)


@section("notebooks_full.json")
def notebooks_full(data: dict) -> list[str]:
    lines = ["## The notebooks in full mode", "",
             f"Each notebook run top to bottom without `A2IJAX_NOTEBOOK_QUICK` (the suite runs them in quick mode), "
             f"its checks and the `figures` its checks cell defines; {provenance(data)}.", "",
             "| notebook | minutes | checks | figures |", "|---|---:|---|---|"]
    for r in data["rows"]:
        figures = compact(r.get("figures", {}))
        lines.append(f"| `{r['notebook']}` | {r['seconds'] / 60:.1f} | {r['checks']} | {figures} |")
    return lines


@section("radial_floor.json")
def radial_floor(data: dict) -> list[str]:
    sizes = sorted({r["n_radial"] for r in data["rows"]})
    lines = ["## The radial basis's least-squares floor", "",
             "The reference forces of held-out frames fitted, in float64, by pair forces in the model's radial "
             "basis (`envelope(x) * bessel_basis(x, n)`, one set of coefficients per species pair) on the other "
             f"half of the frames: force RMSE over the force std, the floor of a linear radial pathway of n "
             f"functions. {provenance(data)}.", "",
             "| system | state point | frames | " + " | ".join(f"n = {n}" for n in sizes) + " |",
             "|---|---|---:|" + "---:|" * len(sizes)]
    points: dict[tuple[str, str], dict[int, dict]] = {}
    for r in data["rows"]:
        points.setdefault((r["system"], r["state_point"]), {})[r["n_radial"]] = r
    for (system, point), by_n in points.items():
        frames = next(iter(by_n.values()))["frames"]
        cells = " | ".join(percent(by_n[n]["force_rmse_over_std"]) if n in by_n else "" for n in sizes)
        lines.append(f"| {system} | {point} | {frames} | {cells} |")
    return lines


@section("routes.json")
def routes(data: dict) -> list[str]:
    lines = ["## Two routes: attention only, and with the pair pathway", "",
             "The same data and test split, each system trained once per route: the attention-only model (the "
             "paper's single pathway, the models shipped before) and the model with the pair pathway started from "
             "its least-squares fit (docs/design.md, \"The pair pathway\"). Worst state point of the test split; "
             f"seconds per training step from `a2ijax.train.step_seconds` in one run; the step of the checkpoint "
             f"shipped (the best by validation loss). {provenance(data)}.", ""]
    return lines + table(
        ["system", "route", "best step", "training minutes", "s per step", "worst energy ratio", "worst force ratio"],
        "llrrrrr",
        [[r["system"], r["route"], f"{r['steps']:,}", f"{r['train_minutes']:.1f}" if r.get("train_minutes") else "?",
          f"{r['step_seconds']:.3f}", percent(r["worst_energy_ratio"]), percent(r["worst_force_ratio"])]
         for r in data["rows"]])


@section("transfer.json")
def transfer(data: dict) -> list[str]:
    lines = ["## State points and sizes no training run sampled", "",
             "Frames from the project's sampler at temperatures between and beyond the sampled ones and at about "
             "twice the atoms (`experiments/transfer.py`, seed 7, which no training set uses), evaluated with "
             "`a2ijax.report.evaluate`: energy RMSE over those frames' energy fluctuation, force RMSE over their "
             f"force std, and the mean energy error per atom. {provenance(data)}.", ""]
    return lines + table(
        ["system", "model", "state point", "frames", "energy ratio", "force ratio", "bias per atom"], "lllrrrr",
        [[r["system"], r["model"], r["state_point"], str(r["frames"]), percent(r["energy_ratio"]),
          percent(r["force_ratio"]), f"{r['energy_bias_per_atom']:+.4f}"] for r in data["rows"]])


@section("fit_lj.json")
def fit_lj(data: dict) -> list[str]:
    settings = data["settings"]
    lines = ["## Differentiable MD: Lennard-Jones sigma and epsilon from structure and energy", "",
             f"The reference LJ fluid's g(r), pressure (weight {settings['pressure_weight']:g}) and potential energy "
             f"per atom (weight {settings['energy_weight']:g}) at rho 0.84, kT 0.85 as targets; LJ started 12% off in "
             f"both parameters and fitted by {settings['steps']} Adam steps (b2 {settings['adam_b2']:g}) through MD "
             f"(`experiments/fit_lj_structure.py`, seed {settings['seed']}; the other seed measured, and the "
             "earlier settings' stall, in docs/design.md, \"Known limits\"); "
             f"the parameters are the mean over the last quarter of the steps. {provenance(data)}.", ""]
    return lines + table(
        ["route", "sigma", "epsilon", "minutes", "samples or segments"], "lrrrr",
        [[method, f"{r['final']['sigma']:.4f} ({100 * r['error']['sigma']:+.2f}%)",
          f"{r['final']['epsilon']:.4f} ({100 * r['error']['epsilon']:+.2f}%)", f"{r['seconds'] / 60:.1f}",
          str(r["samples"])] for method, r in data["results"].items()])


@section("active_learning.json")
def active_learning(data: dict) -> list[str]:
    lines = ["## Active learning: selection by disagreement, with an upper trust level, and at random", "",
             f"`a2ijax learn` on the LJ fluid from one training frame per state point, {data['rounds']} rounds of "
             f"{data['frames_per_round']} frames picked from the MD of a committee of {data['members']}, retrained "
             "each round; the committee mean's errors on the test split of `data/lj.xyz`. "
             f"{provenance(data)}.", ""]
    rows = [[arm.replace("_", " "), str(r["round"]), str(r["train_frames"]), f"{r['force_rmse']:.3f}",
             percent(r["worst_energy_ratio"]), percent(r["worst_force_ratio"])]
            for arm, curve in data["curves"].items() for r in curve]
    return lines + table(["selection", "round", "training frames", "force RMSE", "worst energy", "worst force"],
                         "lrrrrr", rows)


@section("fresh_clone.json")
def fresh_clone(data: dict) -> list[str]:
    lines = ["## A fresh clone: the README's two commands", "",
             f"{provenance(data)}.", "", "| step | seconds | outcome |", "|---|---:|---|"]
    for r in data["rows"]:
        lines.append(f"| `{r['step']}` | {r['seconds']:.0f} | {r['outcome']} |")
    q = data.get("quickstart")
    if q:
        lines += ["", "The quickstart's model on its held-out frames: energy RMSE "
                  f"{percent(q['energy_rmse_over_fluctuation'])} of the MD energy fluctuation, force RMSE "
                  f"{percent(q['force_rmse_over_std'])} of the force std, "
                  f"per-atom energies Pearson r {q['per_atom_energy_pearson']:.5f}; its NVE run: drift "
                  f"{q['md_drift_per_atom_per_time']:.2g} per atom per time unit, mean kT {q['md_mean_kT']:.3f}, RDF "
                  f"difference {q['rdf_mean_abs_difference']:.3f} (`quickstart/summary.json`)."]
    return lines


def document() -> str:
    sections = [fresh_clone(), accuracy(), routes(), transfer(), radial_floor(), md_checks(), fit_lj(),
                active_learning(), md_memory(), bench(), lammps(), notebooks_full()]
    head = ["# Results", "",
            "Every figure the project states, generated by `python experiments/results.py` from the files that "
            "hold them (the shipped models' `report.json`, the experiments' JSON in `docs/data/`); "
            "`tests/test_results.py` fails when this file and its sources disagree. Do not edit by hand.", ""]
    return "\n".join(head + [line for part in sections for line in part]).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is out of date")
    args = parser.parse_args()
    text = document()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python experiments/results.py", file=sys.stderr)
            sys.exit(1)
        return
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
