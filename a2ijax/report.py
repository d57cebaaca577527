"""Error reports: predictions on held-out frames, errors per state point against the MD
fluctuations, Markdown tables and parity and learning-curve plots; ``evaluate`` for any checkpoint.

The paper's measure, per state point: the RMSE of the total energy over the standard deviation of
the total energy in MD at that state point (the fluctuation), and the force RMSE over the std of the
force components. Per-atom energies are compared with the exact decomposition where the data has one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from a2ijax.batching import Bucket, PreparedData, batches_in_order, fixed_species, prepare
from a2ijax.checkpoint import Checkpoint, load_checkpoint
from a2ijax.dataset import Dataset, fluctuations, read_dataset, split_indices, state_point_groups
from a2ijax.errors import InputError
from a2ijax.loss import predict_fn
from a2ijax.potential import potential_builder


@dataclasses.dataclass
class Predictions:
    """Per-frame predictions, ordered by ``frame_index`` (the frames' indices in the dataset)."""

    frame_index: np.ndarray
    energy: np.ndarray
    forces: list[np.ndarray]
    per_atom: list[np.ndarray] | None  # None: the potential gives no per-atom energies


def predict_buckets(predict: Callable, params: Any, buckets: list[Bucket], batch_size: int) -> Predictions:
    """Predictions for every frame of ``buckets`` (padding rows dropped), with ``predict`` from
    :func:`a2ijax.loss.predict_fn`."""
    index, energy, forces, per_atom = [], [], [], []
    for b, rows in batches_in_order(buckets, batch_size):
        bucket = buckets[b]
        E, F, Ei = (None if x is None else np.asarray(x, np.float64)
                    for x in predict(params, bucket.batch(rows, batch_size)))
        for r, row in enumerate(rows):
            n = int(bucket.n_atoms[row])
            index.append(int(bucket.frame_index[row]))
            energy.append(E[r] + bucket.energy_offset[row])  # the residual's offset back, in float64
            forces.append(F[r, :n])
            per_atom.append(None if Ei is None else Ei[r, :n])
    order = np.argsort(index, kind="stable")
    per_atom = None if any(e is None for e in per_atom) else [per_atom[i] for i in order]
    return Predictions(np.asarray(index)[order], np.asarray(energy)[order], [forces[i] for i in order], per_atom)


def _rmse(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if np.size(x) else float("nan")


def error_report(dataset: Dataset, predictions: Predictions, fluctuation: dict[str, dict[str, float]]) -> dict:
    """Errors of ``predictions`` against ``dataset``: overall, per state point against the MD
    fluctuations ``fluctuation`` (from :func:`fluctuations`), and per-atom energies where known."""
    frames = predictions.frame_index
    n = np.asarray([len(dataset.positions[i]) for i in frames])
    e_err = predictions.energy - dataset.energy[frames]
    f_err = np.concatenate([(predictions.forces[k] - dataset.forces[i]).ravel() for k, i in enumerate(frames)])
    report: dict[str, Any] = dict(
        frames=len(frames), atoms=int(n.sum()),
        energy_rmse_per_atom=_rmse(e_err / n), energy_mae_per_atom=float(np.mean(np.abs(e_err / n))),
        force_rmse=_rmse(f_err), force_mae=float(np.mean(np.abs(f_err))), state_points={})
    position = {i: k for k, i in enumerate(frames)}
    for name, indices in state_point_groups(dataset).items():
        rows = [position[i] for i in indices if i in position]
        if not rows:
            continue
        ref = fluctuation.get(name, {})
        sp_f = np.concatenate([(predictions.forces[k] - dataset.forces[frames[k]]).ravel() for k in rows])
        row = dict(frames=len(rows), energy_rmse=_rmse(e_err[rows]), energy_fluctuation=ref.get("energy_std", np.nan),
                   force_rmse=_rmse(sp_f), force_std=ref.get("force_std", np.nan),
                   energy_bias_per_atom=float(np.mean(e_err[rows] / n[rows])))
        row["energy_ratio"] = row["energy_rmse"] / row["energy_fluctuation"]
        row["force_ratio"] = row["force_rmse"] / row["force_std"]
        report["state_points"][name] = row
    if dataset.per_atom_energies is not None and predictions.per_atom is not None:
        exact = np.concatenate([dataset.per_atom_energies[i] for i in frames])
        model = np.concatenate(predictions.per_atom)
        report["per_atom_energy"] = dict(pearson=float(np.corrcoef(model, exact)[0, 1]), rmse=_rmse(model - exact))
        species = np.concatenate([dataset.species[i] for i in frames])
        if len(np.unique(species)) > 1:
            # Frames of one composition fix per-atom energies only up to a constant per species whose
            # composition-weighted sum is 0 (the gauge): shift each species' model energies by its
            # mean difference from the exact ones, then correlate.
            offset = np.zeros(species.max() + 1)
            for s in np.unique(species):
                offset[s] = np.mean(exact[species == s] - model[species == s])
            fixed = model + offset[species]
            report["per_atom_energy"].update(pearson_gauge_fixed=float(np.corrcoef(fixed, exact)[0, 1]),
                                             rmse_gauge_fixed=_rmse(fixed - exact))
    return report


def format_report(report: dict, units: str = "") -> str:
    """The report as Markdown tables."""
    u = f" ({units})" if units else ""
    lines = [f"{report['frames']} frames, {report['atoms']} atoms{u}",
             f"energy per atom: RMSE {report['energy_rmse_per_atom']:.4g}, MAE {report['energy_mae_per_atom']:.4g}; "
             f"forces: RMSE {report['force_rmse']:.4g}, MAE {report['force_mae']:.4g}"]
    if "per_atom_energy" in report:
        p = report["per_atom_energy"]
        lines.append(f"per-atom energies vs exact: Pearson r {p['pearson']:.4f}, RMSE {p['rmse']:.4g}")
        if "pearson_gauge_fixed" in p:
            lines.append(f"with each species' offset fixed (composition-weighted sum is not identifiable from "
                         f"total energies): r {p['pearson_gauge_fixed']:.4f}, RMSE {p['rmse_gauge_fixed']:.4g}")
    lines += ["", "| state point | frames | E RMSE (total) | E fluctuation | ratio | F RMSE | F std | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["state_points"].items():
        lines.append(f"| {name} | {r['frames']} | {r['energy_rmse']:.4g} | {r['energy_fluctuation']:.4g} | "
                     f"{100 * r['energy_ratio']:.2f}% | {r['force_rmse']:.4g} | {r['force_std']:.4g} | "
                     f"{100 * r['force_ratio']:.2f}% |")
    return "\n".join(lines)


def parity_plot(path: Path, dataset: Dataset, predictions: Predictions, title: str = "") -> None:
    """Energy-per-atom and force-component parity plots, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = predictions.frame_index
    n = np.asarray([len(dataset.positions[i]) for i in frames])
    ref_f = np.concatenate([dataset.forces[i].ravel() for i in frames])
    pred_f = np.concatenate([f.ravel() for f in predictions.forces])
    pick = np.random.default_rng(0).permutation(len(ref_f))[:20000]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, x, y, what in ((axes[0], dataset.energy[frames] / n, predictions.energy / n, "energy per atom"),
                           (axes[1], ref_f[pick], pred_f[pick], "force component")):
        ax.scatter(x, y, s=3, alpha=0.5)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference {what}")
        ax.set_ylabel(f"model {what}")
        ax.set_title(f"{what}: RMSE {_rmse(y - x):.3g}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curve_plot(path: Path, metrics_path: Path) -> None:
    """Training loss and validation errors against step, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    step = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label in (("train_loss", "training loss (normalised)"), ("valid_loss", "validation loss (normalised)"),
                       ("valid_energy_rmse_per_atom", "validation E RMSE per atom"),
                       ("valid_force_rmse", "validation F RMSE")):
        ax.plot(step, [r[key] for r in rows], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validation_errors(predict: Callable, params: Any, data: PreparedData, split: str, batch_size: int,
                      max_frames: int = 0) -> dict[str, float]:
    """Energy RMSE per atom and force RMSE on ``split``, the mean squared errors divided by the
    loss's scales (``energy_nmse``, ``force_nmse``: the loss's terms) and per state point the
    report's energy and force ratios (``ratios``: name -> [energy, force]), on at most ``max_frames``
    frames (0: all) spread evenly over the split, so that every state point is seen."""
    buckets = data.buckets[split]
    total = sum(len(bucket) for bucket in buckets)
    if max_frames and total > max_frames:
        keep = np.unique(np.linspace(0, total - 1, max_frames).round().astype(int))
        subset, offset = [], 0
        for bucket in buckets:
            rows = keep[(keep >= offset) & (keep < offset + len(bucket))] - offset
            offset += len(bucket)
            if len(rows):
                subset.append(bucket.rows(rows))
        buckets = subset
    predictions = predict_buckets(predict, params, buckets, batch_size)
    report = error_report(data.dataset, predictions, data.statistics["fluctuations"])
    frames, (energy_scale, force_scale) = predictions.frame_index, data.frame_scales
    dataset = data.dataset
    energy_nmse = np.mean(((predictions.energy - dataset.energy[frames]) / energy_scale[frames]) ** 2)
    force_nmse = np.mean(np.concatenate([((f - dataset.forces[i]) / force_scale[i]).ravel() ** 2
                                         for f, i in zip(predictions.forces, frames, strict=True)]))
    ratios = {name: [row["energy_ratio"], row["force_ratio"]] for name, row in report["state_points"].items()}
    return dict(energy_rmse_per_atom=report["energy_rmse_per_atom"], force_rmse=report["force_rmse"],
                energy_nmse=float(energy_nmse), force_nmse=float(force_nmse), ratios=ratios)


def final_report(workdir: Path, data: PreparedData, predict: Callable, batch_size: int, write: bool = True) -> dict:
    """Evaluates the best checkpoint on the test split (validation if there is none) with ``predict``
    (from :func:`predict_fn`); writes ``report.json``, ``report.md``, ``parity.png`` and
    ``learning_curve.png`` (unless ``write`` is False: processes other than 0 only compute)."""
    checkpoint = load_checkpoint(workdir / "checkpoints" / "best")
    split = "test" if len(data.splits["test"]) else "valid"
    predictions = predict_buckets(predict, checkpoint.params, data.buckets[split], batch_size)
    report = error_report(data.dataset, predictions, data.statistics["fluctuations"])
    report.update(split=split, checkpoint=str(checkpoint.path), step=checkpoint.step,
                  parameters=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(checkpoint.params))))
    if write:
        write_report(workdir, report, data.dataset, predictions, units=checkpoint.meta.get("units", ""))
        learning_curve_plot(workdir / "learning_curve.png", workdir / "metrics.jsonl")
    return report


def write_report(out: Path, report: dict, dataset: Dataset, predictions: Predictions, units: str = "") -> str:
    """Writes ``report.json``, ``report.md`` and ``parity.png`` into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(report, units)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(text + "\n")
    parity_plot(out / "parity.png", dataset, predictions, title=f"{dataset.path} ({report.get('split', 'all')})")
    return text


def predict_dataset(checkpoint: Checkpoint, data_path: str | Path, split: str | None = None, batch_size: int = 4,
                    atom_chunk: int | None = None, params: Sequence[Any] | None = None
                    ) -> tuple[Dataset, list[Predictions]]:
    """A checkpoint's predictions for the frames of a labelled dataset (all, or one ``split``, as
    the checkpoint's config splits the file), one :class:`Predictions` per parameter set in ``params``
    (default: the checkpoint's own; a committee's members share its architecture, data preparation
    and compiled program); ``atom_chunk``: see :func:`a2ijax.a2i_neighbor_list`."""
    config = checkpoint.config
    dataset = read_dataset(data_path, checkpoint.symbols)
    if split is not None:
        indices = split_indices(dataset, config.data.split_fractions, config.train.seed)[split]
        if not len(indices):
            raise InputError(f"{data_path}: no frames in split {split!r}")
    else:
        indices = np.arange(len(dataset))
    data = prepare(dataset, config, statistics=checkpoint.meta["statistics"],
                   splits=dict(train=np.zeros(0, int), valid=np.zeros(0, int), test=indices))
    _, energy_fn, per_atom = potential_builder(config, fixed_species(dataset, config), atom_chunk=atom_chunk)
    predict = jax.jit(predict_fn(energy_fn, per_atom))
    params = [checkpoint.params] if params is None else params
    return dataset, [predict_buckets(predict, p, data.buckets["test"], batch_size) for p in params]


def evaluate(checkpoint: str | Path | Checkpoint, data_path: str | Path, split: str | None = None,
             out: str | Path | None = None, batch_size: int = 4, atom_chunk: int | None = None) -> tuple[dict, str]:
    """Error report of a checkpoint (a path, or a loaded :class:`a2ijax.checkpoint.Checkpoint`: a
    pretrained model, or one with fine-tuned parameters put in) on any labelled dataset (all
    frames, or one ``split``; :func:`predict_dataset`).

    Fluctuations are taken from every frame of the file at each state point.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    dataset, (predictions,) = predict_dataset(checkpoint, data_path, split, batch_size, atom_chunk)
    report = error_report(dataset, predictions, fluctuations(dataset))
    report.update(split=split or "all", checkpoint=str(checkpoint.path), step=checkpoint.step)
    text = format_report(report, checkpoint.meta.get("units", ""))
    if out is not None:
        write_report(Path(out), report, dataset, predictions, checkpoint.meta.get("units", ""))
    return report, text
