"""The least-squares floor of the model's linear radial pathway on reference frames (issue: the
paper's claim; docs/design.md, "Known limits").

A token's distance enters the model as a linear map of ``envelope(x) * bessel_basis(x, n)`` (``x =
d / r_c``). How well can any linear combination of those ``n`` functions, one per species pair,
represent the reference pair force? For each ``n`` this fits, in float64, the atoms' forces of the
reference frames as ``F_i = sum_j f_ab(d_ij) r_ij / d_ij`` with ``f_ab`` in that basis, on half of
the frames, and reports the force RMSE on the other half over the force std. For LJ and KA (pair
potentials) a floor well above zero means the basis, not training, limits the forces; SW's
three-body term has no such floor to take.

    python experiments/radial_floor.py --out runs/radial_floor.json
    python experiments/radial_floor.py --systems ka --n 8 16 --frames 40 --out runs/radial_floor_ka.json

Frames come from ``a2ijax.sampling.generate`` at each named state point (shorter equilibration
than the shipped data's; the floor depends on the distances sampled, not on decorrelation).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

STATE_POINTS = {"lj": ["rho0.84_T0.85", "rho0.80_T2.0"], "ka": ["rho1.2_T0.6", "rho1.2_T2.0"]}


def basis(x: np.ndarray, n: int) -> np.ndarray:
    """The model's own radial features in float64: ``envelope(x) * bessel_basis(x, n)`` (the default
    polynomial envelope, a2ijax.model), ``[..., n]``."""
    import jax.numpy as jnp

    from a2ijax.model import bessel_basis, envelope

    x = jnp.asarray(x, jnp.float64)
    return np.asarray(envelope(x)[..., None] * bessel_basis(x, n))


def design(frames, cutoff: float, n: int, n_species: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows: every force component of every atom; columns: basis function k of species pair (a <= b)."""
    from a2ijax.geometry import minimum_image, neighbor_pairs

    pairs = {(a, b): m for m, (a, b) in enumerate((a, b) for a in range(n_species) for b in range(a, n_species))}
    blocks, targets = [], []
    for R, cell, species, forces in frames:
        i, j, d = neighbor_pairs(R, cell, True, cutoff)
        u = minimum_image(R[j] - R[i], cell, True) / d[:, None]  # from i to j
        phi = basis(d / cutoff, n)  # [P, n]
        a, b = np.minimum(species[i], species[j]), np.maximum(species[i], species[j])
        column = np.asarray([pairs[(int(x), int(y))] for x, y in zip(a, b, strict=True)])
        A = np.zeros((len(R), 3, len(pairs) * n))
        # F_i = -sum_j f(d) u_ij with f = dV/dd: fit f; the sign goes into the coefficients.
        for m in range(len(pairs)):
            sel = column == m
            np.add.at(A[:, :, m * n:(m + 1) * n], i[sel], u[sel][:, :, None] * phi[sel][:, None, :])
        blocks.append(A.reshape(-1, len(pairs) * n))
        targets.append(forces.reshape(-1))
    return np.concatenate(blocks), np.concatenate(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", default=["lj", "ka"], choices=sorted(STATE_POINTS))
    parser.add_argument("--n", nargs="+", type=int, default=[8, 12, 16, 24])
    parser.add_argument("--frames", type=int, default=40, help="frames per state point (half fit, half test)")
    parser.add_argument("--equilibration", type=int, default=5000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)  # the fit and the labels in float64
    from a2ijax.sampling import SamplingConfig, generate
    from a2ijax.systems import get_system

    rows = []
    for name in args.systems:
        system = get_system(name)
        for point in STATE_POINTS[name]:
            t0 = time.perf_counter()
            config = SamplingConfig(frames_per_point=args.frames, equilibration=args.equilibration,
                                    segment_frames=max(1, args.frames // 4))  # (the splits are not used)
            images = generate(name, config, state_points=[point], progress=False)
            frames = [(a.get_positions(), np.asarray(a.get_cell()), np.asarray([system.symbols.index(s)
                       for s in a.get_chemical_symbols()]), a.get_forces()) for a in images]
            half = len(frames) // 2
            sampled = time.perf_counter() - t0
            for n in args.n:
                A, y = design(frames[:half], system.cutoff, n, len(system.symbols))
                coefficients, *_ = np.linalg.lstsq(A, y, rcond=None)
                A, y = design(frames[half:], system.cutoff, n, len(system.symbols))
                rmse = float(np.sqrt(np.mean((A @ coefficients - y) ** 2)))
                row = dict(system=name, state_point=point, n_radial=n, frames=len(frames),
                           force_rmse_over_std=rmse / float(np.std(y)), sampling_s=sampled)
                rows.append(row)
                print(f"{name} {point:>14} n={n:>2}: force RMSE / std {100 * row['force_rmse_over_std']:.2f}%",
                      flush=True)
    out = dict(command="python experiments/radial_floor.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()), date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
