"""``a2ijax bench``: rows, ratios and files on a tiny run (the figures themselves live in docs/results.md)."""

import json

import jax
import numpy as np
import pytest
from jax_md import energy, space

from a2ijax import a2i_neighbor_list, bench, pretrained


def test_bench_writes_consistent_rows_and_ratios(tmp_path):
    result = bench.run(["lj", "a2i-small"], [128], out=tmp_path, chunk=4, chunks=1, repeats=1, argv=["test"])
    rows = {r["potential"]: r for r in result["rows"]}
    assert set(rows) == {"lj", "a2i-small"}
    for r in rows.values():
        assert r["n"] == 128 and r["neighbor_list"] in ("cell list", "all pairs")
        np.testing.assert_allclose(r["atom_steps_per_s"] * r["md_chunk_s"], 128 * 4, rtol=1e-6)
        np.testing.assert_allclose(r["time_per_day"], r["atom_steps_per_s"] / 128 * bench.DT * 86400, rtol=1e-6)
    # The parameter count is that of the model's own initialisation, independent of the bench.
    R, side = bench.liquid(128)
    displacement = space.periodic(side)[0]
    neighbor_fn, init_fn, _ = a2i_neighbor_list(displacement, side, bench.A2I_VARIANTS["a2i-small"])
    params = init_fn(jax.random.PRNGKey(0), R, neighbor_fn.allocate(R))
    assert rows["a2i-small"]["parameters"] == sum(x.size for x in jax.tree_util.tree_leaves(params)) > 1000
    assert rows["lj"]["parameters"] == 0 and rows["a2i-small"]["attention_keys"] is None
    # The Markdown row of A2I carries its time per atom-step over LJ's.
    line = next(line for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| a2i-small"))
    ratio = line.split("|")[12].strip()
    expected = rows["a2i-small"]["us_per_atom_step"] / rows["lj"]["us_per_atom_step"]
    assert ratio == f"{expected:.3g}"  # the column's three significant digits, exactly
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["environment"]["backend"] == jax.default_backend() and saved["environment"]["command"] == "test"
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert bench.flatness(result, "a2i-small") is None  # one size: nothing to compare


def test_a_shipped_model_runs_through_its_checkpoint_potential(tmp_path):
    """The shipped LJ row is ``pretrained.load("lj").potential(box)`` on this package's cell list,
    with the model's attention keys, stepped by md.run: its energy is the checkpoint's own."""
    row = bench.measure("lj-pretrained", 512, chunk=2, chunks=1, repeats=1)  # a box of 3 cells of 2.8
    assert row["kind"] == "A2I shipped" and row["n"] == 512 and row["attention_keys"] >= 24
    assert row["neighbor_list"] == "cell list" and row["host_peak_rss_mib"] > 0
    checkpoint = pretrained.load("lj")
    assert row["parameters"] == sum(np.size(x) for x in jax.tree_util.tree_leaves(checkpoint.params))
    built = bench.build("lj-pretrained", 512)
    potential = checkpoint.potential(np.eye(3) * built.side, built.species, dr_threshold=0.3)
    R = built.R
    np.testing.assert_allclose(built.potential.energy_fn(R, neighbor=built.potential.neighbor_fn.allocate(R)),
                               potential.energy_fn(R, neighbor=potential.neighbor_fn.allocate(R)), rtol=1e-6)


def test_bench_rejects_unknown_potential(tmp_path):
    with pytest.raises(ValueError, match="unknown potential 'mace'.*nequip"):
        bench.run(["lj", "mace"], [128], out=tmp_path)


def test_bench_per_step_sync_counts_the_same_steps(tmp_path):
    """One step per compiled chunk with a host check after each (the ablation's contrast to the scan)
    times the same number of steps, and the LJ list is built with the cutoff of the LJ energy: the
    bench's list and jax-md's own give the same energy."""
    row = bench.measure("lj", 128, sync_every_step=True, chunk=4, chunks=2, repeats=1)
    np.testing.assert_allclose(row["atom_steps_per_s"] * row["md_chunk_s"], 128 * 4, rtol=1e-6)
    assert row["sync_every_step"]
    built = bench.build("lj", 128)
    R, side = built.R, built.side
    own_neighbor_fn, own_energy = energy.lennard_jones_neighbor_list(space.periodic(side)[0], side,
                                                                     r_cutoff=bench.CUTOFF)
    e_bench = built.potential.energy_fn(R, neighbor=built.potential.neighbor_fn.allocate(R))
    e_own = own_energy(R, neighbor=own_neighbor_fn.allocate(R))
    assert abs(float(e_own)) > 1.0
    np.testing.assert_allclose(e_bench, e_own, rtol=1e-6)


def test_bench_config_overrides_only_for_a2i():
    with pytest.raises(ValueError, match="apply to the A2I variants only.*'lj'"):
        bench.build("lj", 128, atom_chunk=0)


def test_a_potential_that_fails_gets_a_row_and_the_bench_goes_on(tmp_path, monkeypatch):
    measure = bench.measure

    def blowing_up(name, n, **kw):
        if name == "graph_network":
            raise bench.BlowUp(f"{name} at N={n}: positions stopped being finite")
        return measure(name, n, **kw)

    monkeypatch.setattr(bench, "measure", blowing_up)
    result = bench.run(["graph_network", "lj"], [64, 128], out=tmp_path, chunk=2, chunks=1, repeats=1, argv=["t"])
    assert [(r["potential"], r["n"]) for r in result["rows"]] == [("lj", 64), ("lj", 128)]
    (skipped,) = result["skipped"]
    assert skipped["potential"] == "graph_network" and skipped["n"] == 64
    assert "stopped being finite" in skipped["reason"]
    assert "failed or skipped: graph_network N 64" in (tmp_path / "bench.md").read_text()


def test_isolated_rows_run_in_their_own_process_and_a_failure_is_a_row(tmp_path):
    """``isolate`` (the command's default): each row in its own interpreter, its own peak memory; a
    row whose process fails is recorded with the error it printed, and the next potential runs."""
    # 64 Kob-Andersen atoms at density 1.2 fill a box too narrow for the shipped model's cutoff.
    result = bench.run(["ka-pretrained", "lj"], [64], out=tmp_path, chunk=2, chunks=1, repeats=1, argv=["t"],
                       isolate=True)
    (row,) = result["rows"]
    assert row["potential"] == "lj" and row["host_peak_rss_mib"] > 0
    (failed,) = result["skipped"]
    assert failed["potential"] == "ka-pretrained" and "box too small" in failed["reason"]
