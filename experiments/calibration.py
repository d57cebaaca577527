"""Calibration of committees: the members' force disagreement against the true error, on test splits.

    python experiments/calibration.py lj=runs/committee_lj sw=runs/committee_sw ka=runs/committee_ka \
        --out runs/calibration

Each committee (``a2ijax train CONFIG --members M``) predicts the test split of the dataset it was
trained on (every member with one compiled program, ``a2ijax.report.predict_dataset``). Per atom,
the predicted error is the disagreement ``sigma_i`` (``a2ijax.committee.force_disagreement``: the
members' force spread, per component) and the true error ``e_i`` is the RMS over the components of
the committee mean's force error; per frame, both are RMS over the frame's atoms. Reported: Pearson
correlation of log sigma and log e and Spearman rank correlation, per atom and per frame, and the
ratio RMS(e) / RMS(sigma) (1: calibrated; above 1: the committee underestimates its error). The
PNG has the binned calibration curve (atoms in 20 quantile bins of sigma) and the per-frame scatter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from a2ijax import committee
from a2ijax.files import atomic_write
from a2ijax.report import predict_dataset


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def correlations(sigma: np.ndarray, error: np.ndarray) -> dict[str, float]:
    return dict(pearson_log=float(np.corrcoef(np.log(sigma), np.log(error))[0, 1]),
                spearman=float(np.corrcoef(ranks(sigma), ranks(error))[0, 1]),
                rms_error_over_rms_sigma=float(np.sqrt(np.mean(error**2) / np.mean(sigma**2))))


def calibrate(workdir: str) -> dict:
    group = committee.load(workdir)
    dataset, runs = predict_dataset(group.members[0], group.meta["data_path"], "test",
                                    params=[m.params for m in group.members])
    sigma_atoms, error_atoms, sigma_frames, error_frames = [], [], [], []
    for k, index in enumerate(runs[0].frame_index):
        forces = np.stack([p.forces[k] for p in runs])  # [M, n, 3]
        sigma = np.asarray(committee.force_disagreement(forces), np.float64)
        error = np.sqrt(np.mean((forces.mean(0) - dataset.forces[index]) ** 2, axis=-1))
        sigma_atoms.append(sigma)
        error_atoms.append(error)
        sigma_frames.append(np.sqrt(np.mean(sigma**2)))
        error_frames.append(np.sqrt(np.mean(error**2)))
    sigma_atoms, error_atoms = np.concatenate(sigma_atoms), np.concatenate(error_atoms)
    sigma_frames, error_frames = np.asarray(sigma_frames), np.asarray(error_frames)
    edges = np.quantile(sigma_atoms, np.linspace(0, 1, 21))
    which = np.clip(np.searchsorted(edges, sigma_atoms, side="right") - 1, 0, 19)
    rms = lambda x, b: float(np.sqrt(np.mean(x[which == b] ** 2)))  # noqa: E731
    binned = [(rms(sigma_atoms, b), rms(error_atoms, b)) for b in range(20) if np.any(which == b)]
    return dict(members=group.size, frames=len(sigma_frames), atoms=len(sigma_atoms),
                per_atom=correlations(sigma_atoms, error_atoms), per_frame=correlations(sigma_frames, error_frames),
                binned=binned, frame_sigma=sigma_frames.tolist(), frame_error=error_frames.tolist(),
                units=group.meta.get("units", ""))


def plot(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 7.5), squeeze=False)
    for column, (name, r) in enumerate(results.items()):
        top, bottom = axes[0, column], axes[1, column]
        s, e = np.asarray(r["binned"]).T
        top.loglog(s, e, "o-", label="atoms, 20 quantile bins")
        lims = [min(s.min(), e.min()), max(s.max(), e.max())]
        top.plot(lims, lims, "k:", lw=0.8, label="calibrated")
        top.set(title=f"{name}: M = {r['members']}, per-atom Spearman {r['per_atom']['spearman']:.2f}",
                xlabel="RMS predicted (disagreement)", ylabel="RMS true force error")
        top.legend(fontsize=7)
        bottom.loglog(r["frame_sigma"], r["frame_error"], ".", ms=4)
        lims = [min(min(r["frame_sigma"]), min(r["frame_error"])), max(max(r["frame_sigma"]), max(r["frame_error"]))]
        bottom.plot(lims, lims, "k:", lw=0.8)
        bottom.set(title=f"frames: Spearman {r['per_frame']['spearman']:.2f}", xlabel="frame RMS disagreement",
                   ylabel="frame RMS true force error")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("committees", nargs="+", help="NAME=WORKDIR of a committee")
    parser.add_argument("--out", default="runs/calibration")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in args.committees:
        name, workdir = spec.split("=", 1)
        results[name] = r = calibrate(workdir)
        atoms, frames = r["per_atom"], r["per_frame"]
        print(f"{name}: {r['members']} members, {r['frames']} test frames; per atom Spearman {atoms['spearman']:.3f} "
              f"(log Pearson {atoms['pearson_log']:.3f}), per frame Spearman {frames['spearman']:.3f}; "
              f"RMS error / RMS disagreement {atoms['rms_error_over_rms_sigma']:.2f}")
    atomic_write(out / "calibration.json", lambda f: json.dump(results, f, indent=1))
    plot(out / "calibration.png", results)
    print(f"wrote {out}/calibration.json and calibration.png")


if __name__ == "__main__":
    main()
