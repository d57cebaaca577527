"""``a2ijax bench``: rows, ratios and files on a tiny run (the figures themselves live in BUILD_NOTES)."""

import json

import jax
import numpy as np
import pytest
from jax_md import energy, space

from a2ijax import bench


def test_bench_writes_consistent_rows_and_ratios(tmp_path):
    result = bench.run(["lj", "a2i-small"], [128], out=tmp_path, chunk=4, chunks=1, repeats=1, argv=["test"])
    rows = {r["potential"]: r for r in result["rows"]}
    assert set(rows) == {"lj", "a2i-small"}
    for r in rows.values():
        assert r["n"] == 128
        np.testing.assert_allclose(r["atom_steps_per_s"] * r["md_chunk_s"], 128 * 4, rtol=1e-6)
        np.testing.assert_allclose(r["time_per_day"], r["atom_steps_per_s"] / 128 * bench.DT * 86400, rtol=1e-6)
    # The parameter count is that of the model's own initialisation, independent of the bench.
    R, side = bench.liquid(128)
    pot = bench.build("a2i-small", space.periodic(side)[0], side, R, 0.3, jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(pot.params))
    assert rows["a2i-small"]["parameters"] == n_params > 1000
    assert rows["lj"]["parameters"] == 0
    # The Markdown row of A2I carries its time per atom-step over LJ's.
    line = next(line for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| a2i-small"))
    ratio = line.split("|")[8].strip()
    expected = rows["a2i-small"]["us_per_atom_step"] / rows["lj"]["us_per_atom_step"]
    assert ratio == f"{expected:.3g}"  # the column's three significant digits, exactly
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["environment"]["backend"] == jax.default_backend() and saved["environment"]["command"] == "test"
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert bench.flatness(result) is None  # one size: nothing to compare


def test_bench_rejects_unknown_potential(tmp_path):
    with pytest.raises(ValueError, match="unknown potential 'mace'.*nequip"):
        bench.run(["lj", "mace"], [128], out=tmp_path)


def test_bench_per_step_sync_counts_the_same_steps(tmp_path):
    """One compiled step per call with a host read per step (the ablation's contrast to the scan)
    times the same number of steps, and the LJ list is built with the cutoff of the LJ energy: the
    bench's list and jax-md's own give the same energy."""
    row = bench.measure("lj", 128, sync_every_step=True, donate=False, chunk=4, chunks=2, repeats=1)
    np.testing.assert_allclose(row["atom_steps_per_s"] * row["md_chunk_s"], 128 * 4, rtol=1e-6)
    assert row["sync_every_step"] and not row["donate"]
    R, side = bench.liquid(128)
    displacement = space.periodic(side)[0]
    pot = bench.build("lj", displacement, side, R, 0.3, jax.random.PRNGKey(0))
    own_neighbor_fn, own_energy = energy.lennard_jones_neighbor_list(displacement, side, r_cutoff=bench.CUTOFF)
    e_bench = pot.energy(None, R, pot.neighbor_fn.allocate(R))
    e_own = own_energy(R, neighbor=own_neighbor_fn.allocate(R))
    assert abs(float(e_own)) > 1.0
    np.testing.assert_allclose(e_bench, e_own, rtol=1e-6)


def test_bench_config_overrides_only_for_a2i():
    R, side = bench.liquid(128)
    with pytest.raises(ValueError, match="apply to the A2I variants only.*'lj'"):
        bench.build("lj", space.periodic(side)[0], side, R, 0.3, jax.random.PRNGKey(0), atom_chunk=0)


def test_a_potential_that_blows_up_gets_a_row_and_the_bench_goes_on(tmp_path, monkeypatch):
    measure = bench.measure

    def blowing_up(name, n, **kw):
        if name == "graph_network":
            raise bench.BlowUp(f"{name} at N={n}: overflow or non-finite positions while timing")
        return measure(name, n, **kw)

    monkeypatch.setattr(bench, "measure", blowing_up)
    result = bench.run(["graph_network", "lj"], [64, 128], out=tmp_path, chunk=2, chunks=1, repeats=1, argv=["t"])
    assert [(r["potential"], r["n"]) for r in result["rows"]] == [("lj", 64), ("lj", 128)]
    (skipped,) = result["skipped"]
    assert skipped["potential"] == "graph_network" and skipped["n"] == 64 and "non-finite" in skipped["reason"]
    assert "skipped: graph_network N 64" in (tmp_path / "bench.md").read_text()
