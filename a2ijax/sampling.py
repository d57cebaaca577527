"""Reference data: thermostatted MD with a reference potential, labelled in float64.

Frames are sampled from Langevin MD at each state point of a reference system, equilibration
discarded, one frame every ``stride`` steps, and labelled in float64 with energy, forces, per-atom
energies and stress (ASE's sign convention). Consecutive frames form segments of ``segment_frames``,
the unit of the train/valid/test split, and every state point gets segments in every split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import ase
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from jax_md import quantity, simulate, space

from a2ijax.dataset import assign_splits, read_dataset, statistics, write_dataset, write_statistics
from a2ijax.errors import InputError
from a2ijax.geometry import check_widths
from a2ijax.md import run
from a2ijax.systems import ReferenceSystem, StatePoint, diamond_positions, get_system, lattice_positions

EXTXYZ_DECIMALS = 8  # ASE writes per-atom columns as %16.8f


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How many frames to take and how far apart. Defaults give a dataset in minutes on 2 cores.

    Attributes:
      frames_per_point: frames kept per state point.
      stride: MD steps between kept frames (decorrelation).
      equilibration: MD steps discarded at the start of each state point.
      segment_frames: consecutive frames per segment, the unit of the train/valid/test split.
      split_fractions: fractions of segments for train, valid and test.
      friction: Langevin friction (inverse time units of the system).
      seed: seeds the starting configurations, velocities, thermostat noise and the split.
    """

    frames_per_point: int = 200
    stride: int = 50
    equilibration: int = 20000
    segment_frames: int = 20
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    friction: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name, low in (("frames_per_point", 1), ("stride", 1), ("equilibration", 0), ("segment_frames", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise InputError(f"sampling: {name} must be an integer >= {low}, got {value!r}")
        if not self.friction > 0:
            raise InputError(f"sampling: friction must be positive, got {self.friction!r}")

    def check_splits(self) -> None:
        """Raises unless each state point's frames make enough segments for every split (training
        included): :func:`generate` calls it before any MD runs."""
        try:
            assign_splits(self.frames_per_point // self.segment_frames, self.split_fractions,
                          np.random.default_rng(0))
        except ValueError as error:
            raise InputError(f"sampling: {self.frames_per_point} frames per state point in segments of "
                             f"{self.segment_frames}: {error}") from None

    @property
    def equilibration_steps(self) -> int:
        """``equilibration`` rounded up to whole strides (MD runs in chunks of strides)."""
        return -(-self.equilibration // self.stride) * self.stride

    @property
    def steps_per_point(self) -> int:
        return self.equilibration_steps + self.frames_per_point * self.stride


def initial_positions(system: ReferenceSystem, point: StatePoint, seed: int) -> tuple[jax.Array, float]:
    """Starting positions and box side: a diamond crystal, or a jittered grid to melt."""
    if point.phase == "crystal":
        return diamond_positions(round((system.n_atoms / 8) ** (1 / 3)), lattice=(8 / point.density) ** (1 / 3))
    side = (system.n_atoms / point.density) ** (1 / 3)
    return lattice_positions(system.n_atoms, side, jitter=0.05 * side / system.n_atoms ** (1 / 3), seed=seed), side


def sample_state_point(system: ReferenceSystem, point: StatePoint, config: SamplingConfig, seed: int,
                       progress: Callable[[int], Any] | None = None) -> list[ase.Atoms]:
    """Frames of NVT Langevin MD at ``point``, labelled in float64."""
    with jax.enable_x64(True):
        R, side = initial_positions(system, point, seed)
        R = jnp.asarray(R, jnp.float64)
        species = jnp.asarray(system.species(R.shape[0]))
        displacement, shift = space.periodic(side)
        check_widths(np.eye(3) * side, True, system.cutoff)
        neighbor_fn, energy_fn = system.neighbor_list(displacement, side, species, dr_threshold=0.12 * system.cutoff)
        nbrs = neighbor_fn.allocate(R)
        init, apply = simulate.nvt_langevin(energy_fn, shift, system.dt, point.kT, gamma=config.friction)
        state = init(jax.random.PRNGKey(seed), R, mass=system.mass, neighbor=nbrs)
        stride, equilibration = config.stride, config.equilibration_steps
        if equilibration:
            warm = run(apply, state, neighbor_fn, nbrs, equilibration, chunk_steps=min(equilibration, 50 * stride),
                       stride=stride, progress=progress)
            state, nbrs = warm.state, warm.neighbor
        total = config.frames_per_point * stride
        sampled = run(apply, state, neighbor_fn, nbrs, total, chunk_steps=min(total, 50 * stride), stride=stride,
                      observe=lambda state, neighbor: {"position": state.position}, progress=progress)
        return label(system, sampled.observables["position"], species, side)


def label(system: ReferenceSystem, positions: np.ndarray, species: jax.Array, side: float) -> list[ase.Atoms]:
    """ASE frames with float64 energy, forces, per-atom energies and stress from the reference."""
    with jax.enable_x64(True):
        displacement, _ = space.periodic(side)
        neighbor_fn, energy_fn = system.neighbor_list(displacement, side, species)
        box = jnp.eye(3) * side

        @jax.jit
        def labels(R, nbrs):
            energy, grad = jax.value_and_grad(lambda R: energy_fn(R, nbrs))(R)
            per_atom = energy_fn(R, nbrs, per_atom=True)
            virial = quantity.stress(lambda R, **kw: energy_fn(R, **kw), R, box, neighbor=nbrs)
            return energy, -grad, per_atom, -virial  # ASE stress = -(jax-md's potential stress)

        images = []
        nbrs = None
        symbols = [system.symbols[s] for s in np.asarray(species)]
        for R in np.asarray(positions, np.float64):
            # Label the positions exactly as extended XYZ stores them (8 decimals), so that file
            # positions and labels agree to float64 precision.
            R = jnp.asarray(np.round(np.mod(R, side), EXTXYZ_DECIMALS))
            nbrs = neighbor_fn.allocate(R) if nbrs is None else nbrs.update(R)
            if bool(nbrs.did_buffer_overflow):
                nbrs = neighbor_fn.allocate(R)
            energy, forces, per_atom, stress = (np.asarray(x) for x in labels(R, nbrs))
            atoms = ase.Atoms(symbols=symbols, positions=np.asarray(R), cell=np.eye(3) * side, pbc=True)
            atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=forces, energies=per_atom,
                                               stress=stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
            images.append(atoms)
    return images


def generate(system_name: str, config: SamplingConfig = SamplingConfig(),
             state_points: Sequence[str] | None = None, progress: bool = True) -> list[ase.Atoms]:
    """Reference frames for every state point of a system, labelled, segmented and split."""
    from a2ijax import __version__

    system = get_system(system_name)
    points = system.state_points if state_points is None else [system.state_point(p) for p in state_points]
    config.check_splits()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps_per_point * len(points), unit="step", desc=f"generate {system_name}")
    rng = np.random.default_rng(config.seed)
    images: list[ase.Atoms] = []
    try:
        for index, point in enumerate(points):
            if bar is not None:
                bar.set_postfix_str(point.name)
            point_frames = sample_state_point(system, point, config, seed=config.seed * 1000 + index,
                                              progress=None if bar is None else bar.update)
            n_segments = len(point_frames) // config.segment_frames
            splits = assign_splits(n_segments, config.split_fractions, rng)
            for i, atoms in enumerate(point_frames[: n_segments * config.segment_frames]):
                segment = i // config.segment_frames
                atoms.info.update(system=system.name, state_point=point.name, kT=point.kT, density=point.density,
                                  phase=point.phase, seed=config.seed, frame=i, segment=f"{point.name}/{segment}",
                                  split=splits[segment], split_seed=config.seed, units=system.units,
                                  species_symbols=" ".join(system.symbols), code_version=f"a2ijax {__version__}",
                                  stride=config.stride, dt=system.dt)
                images.append(atoms)
    finally:
        if bar is not None:
            bar.close()
    return images




def write_reference_dataset(system_name: str, out: str, config: SamplingConfig = SamplingConfig(),
                            state_points: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """``a2ijax generate``: samples the system, writes the dataset to ``out`` atomically, reads it back
    (the file, checked, is the dataset) and writes its statistics to ``out.stats.json``; returns them."""
    t0 = time.perf_counter()
    system = get_system(system_name)
    images = generate(system.name, config, state_points=state_points, progress=progress)
    write_dataset(out, images)
    table = statistics(read_dataset(out), system.cutoff)
    summary = dict(system=system.name, cutoff=system.cutoff, units=system.units, frames=len(images),
                   sampling=dataclasses.asdict(config), seconds=time.perf_counter() - t0, state_points=table)
    write_statistics(f"{out}.stats.json", summary)
    return summary
