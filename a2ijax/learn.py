"""Active learning (``a2ijax learn CONFIG``): label the frames where a committee disagrees most.

One TOML file holds the experiment (``[data]``, ``[model]``, ``[train]``, as for ``a2ijax train``)
and a ``[learn]`` table (:class:`LearnConfig`). ``[data] path`` is the small labelled set to start
from; its frames need split headers (``a2ijax generate`` writes them). Each round ``r`` works in
``WORKDIR/round_<r>/``:

1. train a committee (:func:`a2ijax.train.train_committee`) on ``WORKDIR/labelled.xyz``, the
   labelled set so far, and test its mean on the test frames (``test.json``);
2. unless it is the last round, run committee MD (Langevin, each state point's temperature, from
   the last training frame of that state point: never a test frame) and keep a candidate frame every
   ``candidate_every`` steps, with its per-atom force disagreement (``candidates.extxyz``);
3. select ``frames_per_round`` candidates: the largest disagreement of any atom (``selection =
   "disagreement"``) or at random (``"random"``, the baseline) (``selected.json``);
4. label them with the reference potential (or the labeller given to :func:`learn`), one by one,
   each appended to ``labelled_partial.extxyz`` as soon as it is labelled, and add them to
   ``labelled.xyz`` as training frames (``added_in_round = r`` in their headers).

Every step leaves a file before the next starts, so rerunning the command after an interruption
continues where it stopped: a trained member is not retrained, a labelled frame is not relabelled.
``learning_curve.json`` lists, per round, the number of training frames and the test errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np

from a2ijax.config import ExperimentConfig, experiment_from_dict, from_dict
from a2ijax.dataset import fluctuations, write_dataset
from a2ijax.errors import InputError
from a2ijax.files import atomic_write

SELECTIONS = ("disagreement", "random")
Labeller = Callable[[ase.Atoms], ase.Atoms]


@dataclasses.dataclass(frozen=True)
class LearnConfig:
    """The ``[learn]`` table.

    Attributes:
      system: the reference system (``lj``, ``sw``, ``ka``): its potential labels the selected
        frames, and its state points give the MD temperatures and time step.
      state_points: where to run committee MD (default: every state point of the initial data).
      rounds: rounds of selection; the committee is trained ``rounds + 1`` times.
      members: committee size (>= 2).
      frames_per_round: frames labelled per round.
      md_steps: committee MD steps per state point and round.
      candidate_every: MD steps between candidate frames.
      selection: ``"disagreement"`` or ``"random"`` (the baseline to compare against).
      max_disagreement: candidates whose largest per-atom disagreement is above this are not
        selected (0: no limit): an upper trust level, as in DP-GEN, for committee MD that has left
        the physical configurations (with a poorly trained committee, the most uncertain frames are
        often such, and fitting them costs accuracy where it matters; BUILD_NOTES.md history).
      friction: Langevin friction of the committee MD (inverse time units).
      test_data: labelled frames to test every round on (default: ``[data] path``), and
        ``test_split``: which of their splits (``"test"``; ``""``: all frames).
      seed: MD velocities and random selection.
    """

    system: str = ""
    state_points: tuple[str, ...] = ()
    rounds: int = 3
    members: int = 2
    frames_per_round: int = 8
    md_steps: int = 400
    candidate_every: int = 20
    selection: str = "disagreement"
    max_disagreement: float = 0.0
    friction: float = 1.0
    test_data: str = ""
    test_split: str = "test"
    seed: int = 0

    def __post_init__(self):
        from a2ijax.systems import SYSTEMS

        if self.system not in SYSTEMS:
            raise InputError(f"[learn] system must be one of {sorted(SYSTEMS)}, got {self.system!r}")
        for name, low in (("rounds", 0), ("members", 2), ("frames_per_round", 1), ("md_steps", 1),
                          ("candidate_every", 1)):
            if getattr(self, name) < low:
                raise InputError(f"[learn] {name} must be >= {low}, got {getattr(self, name)}")
        if self.md_steps % self.candidate_every:
            raise InputError(f"[learn] md_steps ({self.md_steps}) must be a multiple of candidate_every "
                             f"({self.candidate_every})")
        if self.selection not in SELECTIONS:
            raise InputError(f"[learn] selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not self.max_disagreement >= 0:
            raise InputError(f"[learn] max_disagreement must be >= 0 (0: no limit), got {self.max_disagreement}")
        if not self.friction > 0:
            raise InputError(f"[learn] friction must be positive, got {self.friction}")
        if self.test_split not in ("", "train", "valid", "test"):
            raise InputError(f"[learn] test_split must be train, valid, test or empty, got {self.test_split!r}")


def load_learn_config(path: str | Path) -> tuple[ExperimentConfig, LearnConfig]:
    """The experiment and the ``[learn]`` table of one TOML file; errors name the file."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
        learn = values.pop("learn", None)
        if learn is None:
            raise InputError("no [learn] table (see a2ijax.learn.LearnConfig)")
        return experiment_from_dict(values), from_dict(LearnConfig, learn, "learn")
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise InputError(f"{path}: {error}") from error


def reference_labeller(system_name: str) -> Labeller:
    """Labels a frame (a cubic periodic cell) with the reference potential of ``system_name``."""
    from a2ijax.sampling import label
    from a2ijax.systems import get_system

    system = get_system(system_name)
    ids = {s: i for i, s in enumerate(system.symbols)}

    def labeller(atoms: ase.Atoms) -> ase.Atoms:
        cell = np.asarray(atoms.cell[:])
        side = float(cell[0, 0])
        if not np.allclose(cell, np.eye(3) * side):
            raise InputError(f"the {system_name} reference labels cubic cells only, got {cell.tolist()}")
        species = jnp.asarray([ids[s] for s in atoms.get_chemical_symbols()], jnp.int32)
        return label(system, atoms.get_positions()[None], species, side)[0]

    return labeller


def calculator_labeller(calculator: Any) -> Labeller:
    """Labels a frame with any ASE calculator (DFT, a classical potential): energy, forces, and the
    per-atom energies where the calculator gives them."""
    from ase.calculators.singlepoint import SinglePointCalculator

    def labeller(atoms: ase.Atoms) -> ase.Atoms:
        atoms = atoms.copy()
        atoms.calc = calculator
        results = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        try:
            results["energies"] = atoms.get_potential_energies()
        except Exception:  # noqa: BLE001 (calculators without per-atom energies raise various errors)
            pass
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    return labeller


def select(score: np.ndarray, learn_config: LearnConfig, round_index: int) -> np.ndarray:
    """Indices of the candidates to label: at most ``frames_per_round`` of those with a score (largest
    per-atom disagreement) within ``max_disagreement``, the largest first, or drawn at random."""
    eligible = np.flatnonzero(score <= learn_config.max_disagreement) if learn_config.max_disagreement else \
        np.arange(len(score))
    count = min(learn_config.frames_per_round, len(eligible))
    if learn_config.selection == "disagreement":
        return eligible[np.argsort(-score[eligible], kind="stable")[:count]]
    return np.random.default_rng(learn_config.seed + round_index).choice(eligible, count, replace=False)


def _append(path: Path, atoms: ase.Atoms) -> None:
    with open(path, "a") as f:
        ase.io.write(f, atoms, format="extxyz")
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> list[ase.Atoms]:
    return ase.io.read(path, index=":") if path.exists() and path.stat().st_size else []


def held_out_errors(members: list[Any], data_path: str, split: str | None) -> dict[str, Any]:
    """The committee mean's errors on labelled frames (the report's measures, worst state point)."""
    from a2ijax.report import Predictions, error_report, predict_dataset

    dataset, runs = predict_dataset(members[0], data_path, split, params=[m.params for m in members])
    mean = Predictions(runs[0].frame_index, np.mean([p.energy for p in runs], 0),
                       [np.mean(f, 0) for f in zip(*[p.forces for p in runs], strict=True)], None)
    report = error_report(dataset, mean, fluctuations(dataset))  # the whole file: predict_dataset read it all
    points = report["state_points"].values()
    return dict(force_rmse=report["force_rmse"], energy_rmse_per_atom=report["energy_rmse_per_atom"],
                worst_energy_ratio=max(p["energy_ratio"] for p in points),
                worst_force_ratio=max(p["force_ratio"] for p in points), state_points=report["state_points"])


def committee_candidates(group: Any, start: ase.Atoms, kT: float, dt: float, mass: float, learn: LearnConfig,
                         seed: int) -> tuple[list[ase.Atoms], str]:
    """Candidate frames of Langevin MD with the committee's mean force from ``start``: one every
    ``candidate_every`` steps, each with its per-atom ``disagreement`` array. MD that goes
    non-finite ends early with the frames so far (and a note saying where)."""
    from jax_md import simulate as integrators

    from a2ijax.md import run

    dtype = jnp.result_type(float)
    box = jnp.asarray(start.cell[:].T, dtype)
    species = jnp.asarray([group.symbols.index(s) for s in start.get_chemical_symbols()], jnp.int32)
    R = jnp.asarray(start.get_positions(), dtype)
    skin = 0.1 * group.config.model.cutoff
    neighbor_fn, energy, _, shift = group.potential(box, species, dr_threshold=skin)
    disagreement = group.disagreement(box, species)
    init, apply = integrators.nvt_langevin(energy, shift, dt, kT, gamma=learn.friction)
    nbrs = neighbor_fn.allocate(R)
    state = init(jax.random.PRNGKey(seed), R, mass=mass, neighbor=nbrs)
    frames: list[ase.Atoms] = []

    def keep(done: int, state: Any, neighbor: Any, records: dict[str, np.ndarray]) -> None:
        for k, (R, sigma) in enumerate(zip(records["position"], records["disagreement"], strict=True)):
            atoms = ase.Atoms(start.get_chemical_symbols(), positions=np.mod(R, np.diag(start.cell[:])),
                              cell=start.cell, pbc=True)
            atoms.arrays["disagreement"] = np.asarray(sigma, np.float64)
            step = done - learn.candidate_every * (len(records["position"]) - 1 - k)
            atoms.info.update(md_step=int(step), disagreement=float(np.max(sigma)))
            frames.append(atoms)

    def observe(state: Any, neighbor: Any) -> dict[str, jax.Array]:
        return dict(position=state.position, disagreement=disagreement(state.position, neighbor=neighbor))

    note = ""
    try:
        run(apply, state, neighbor_fn, nbrs, learn.md_steps, chunk_steps=learn.md_steps, stride=learn.candidate_every,
            observe=observe, on_chunk=keep)
    except FloatingPointError as error:
        note = f"committee MD went non-finite: {error}"
    return frames, note


def learn(config: ExperimentConfig, learn_config: LearnConfig, workdir: str | Path, *,
          labeller: Labeller | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """Runs (or continues) the active-learning loop in ``workdir`` (see the module docstring) and
    returns the learning curve: per round, the training frames and the committee's test errors.
    ``labeller`` labels one frame (default: :func:`reference_labeller` of ``[learn] system``; any ASE
    calculator through :func:`calculator_labeller`)."""
    from a2ijax import committee
    from a2ijax.systems import get_system
    from a2ijax.train import train_committee

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    labelled_path = workdir / "labelled.xyz"
    if not labelled_path.exists():
        write_dataset(labelled_path, _read(Path(config.data.path)))
    system = get_system(learn_config.system)
    labeller = labeller or reference_labeller(learn_config.system)
    test_data = learn_config.test_data or config.data.path
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(labelled_path)))
    curve: list[dict[str, Any]] = []
    for r in range(learn_config.rounds + 1):
        here = workdir / f"round_{r}"
        here.mkdir(exist_ok=True)
        labelled = _read(labelled_path)
        train_committee(config, here / "committee", learn_config.members, resume=True, progress=progress)
        group = committee.load(here / "committee")
        if not (here / "test.json").exists():
            row = dict(round=r, train_frames=sum(a.info.get("split") == "train" for a in labelled),
                       **held_out_errors(group.members, test_data, learn_config.test_split or None))
            atomic_write(here / "test.json", lambda f, row=row: json.dump(row, f, indent=1))
        curve.append(json.loads((here / "test.json").read_text()))
        if r == learn_config.rounds:
            break
        if any(a.info.get("added_in_round") == r for a in labelled):
            continue  # this round's frames are labelled and added already
        if not (here / "selected.json").exists():
            candidates, notes = [], []
            # MD starts from a training frame of each state point, whatever its size (the size-split
            # groups of dataset.state_point_groups are for fluctuations, not for naming state points).
            groups: dict[str, list[int]] = {}
            for i, atoms in enumerate(labelled):
                if atoms.info.get("split") == "train":
                    groups.setdefault(str(atoms.info.get("state_point", "")), []).append(i)
            if "" in groups and not learn_config.state_points:
                raise InputError(f"[learn] runs MD at the state points of the training frames, and "
                                 f"{len(groups[''])} of them have no state_point header: name the state points "
                                 "in [learn] state_points")
            for point_name in learn_config.state_points or sorted(groups):
                if not groups.get(point_name):
                    raise InputError(f"[learn] state point {point_name!r} has no training frame to start MD from")
                point = system.state_point(point_name)
                start = labelled[groups[point_name][-1]]
                frames, note = committee_candidates(group, start, point.kT, system.dt, system.mass, learn_config,
                                                    seed=learn_config.seed + 1000 * r + len(notes))
                for atoms in frames:
                    atoms.info.update(state_point=point_name, system=system.name)
                candidates += frames
                notes.append(dict(state_point=point_name, candidates=len(frames), note=note))
            score = np.asarray([a.info["disagreement"] for a in candidates])
            chosen = select(score, learn_config, r)
            write_dataset(here / "candidates.extxyz", candidates)
            selected = dict(selection=learn_config.selection, selected=[int(i) for i in chosen],
                            disagreement=[float(score[i]) for i in chosen], md=notes,
                            above_max_disagreement=int(np.sum(score > learn_config.max_disagreement))
                            if learn_config.max_disagreement else 0)
            atomic_write(here / "selected.json", lambda f, selected=selected: json.dump(selected, f, indent=1))
        chosen = json.loads((here / "selected.json").read_text())["selected"]
        candidates = _read(here / "candidates.extxyz")
        partial = here / "labelled_partial.extxyz"
        done = _read(partial)
        for i in chosen[len(done):]:
            atoms = candidates[i]
            frame = labeller(ase.Atoms(atoms.get_chemical_symbols(), positions=atoms.get_positions(),
                                       cell=atoms.cell, pbc=True))
            frame.info.update({k: atoms.info[k] for k in ("state_point", "system")}, split="train",
                              added_in_round=r, candidate=int(i))
            _append(partial, frame)
        write_dataset(labelled_path, labelled + _read(partial))
    atomic_write(workdir / "learning_curve.json", lambda f: json.dump(curve, f, indent=1))
    return curve
