"""Shows that each invariant test can fail: inject a deliberate fault, run the test, expect red.

Each fault is one textual edit of a copy of the package (the working tree is never touched),
followed by the tests that should catch it. A control run of the same tests on an unmodified copy
comes first and must pass. A fault that a test misses is reported as ESCAPED and the script exits
non-zero.

Usage::

    python experiments/inject_faults.py              # all faults (time and count: BUILD_NOTES.md)
    python experiments/inject_faults.py envelope     # faults whose name contains "envelope"
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, invariant, file, original text, faulty text, tests that must fail)
FAULTS = [
    ("atom-index-embedding", "1 permutation", "a2ijax/model.py",
     "center = _lookup(center_table, species_center)",
     "center = _lookup(center_table, jnp.arange(species_center.shape[0]) % cfg.n_species)",
     ["tests/test_invariants.py::test_permutation_permutes_atom_energies_and_forces"]),
    ("no-minimum-image", "2 translation / periodic images", "a2ijax/neighbors.py",
     "return displacement(R[j], center), pair_mask",
     "return R[j] - center[:, None, :], pair_mask",
     ["tests/test_invariants.py::test_translation_and_periodic_images"]),
    ("raw-x-coordinate-feature", "3 rotation", "a2ijax/model.py",
     "geometry = bessel_basis(x, cfg.n_radial)",
     "geometry = jnp.concatenate([bessel_basis(x, cfg.n_radial), dR[..., :1] / rc], -1)",
     ["tests/test_invariants.py::test_invariant_featurization_is_e3_invariant_free"]),
    ("envelope-without-gradient", "4 forces are -grad E", "a2ijax/model.py",
     "c = envelope(x, cfg.envelope, cfg.envelope_exponent)",
     "c = envelope(jax.lax.stop_gradient(x), cfg.envelope, cfg.envelope_exponent)",
     ["tests/test_invariants.py::test_forces_match_finite_differences",
      "tests/test_md.py::test_nve_conserves_energy_with_second_order_error"]),
    ("padding-slot-read-as-atom", "5 neighbour list = all pairs", "a2ijax/neighbors.py",
     "pair_mask = idx < n_atoms",
     "pair_mask = idx <= n_atoms",
     ["tests/test_invariants.py::test_neighbor_list_equals_all_pairs_periodic"]),
    ("readout-tokens-step-at-cutoff", "6 smooth cutoff", "a2ijax/model.py",
     "y = jnp.einsum(\"nk,nk->n\", c.astype(y.dtype), y) / cfg.avg_neighbors",
     "y = jnp.einsum(\"nk,nk->n\", (x < 1.0).astype(y.dtype), y) / cfg.avg_neighbors",
     ["tests/test_invariants.py::test_energy_and_forces_continuous_through_cutoff"]),
    ("step-envelope", "6 smooth cutoff", "a2ijax/model.py",
     "c = envelope(x, cfg.envelope, cfg.envelope_exponent)",
     "c = (x < 1.0).astype(x.dtype)",
     ["tests/test_invariants.py::test_energy_and_forces_continuous_through_cutoff"]),
    ("global-context", "7 locality / extensivity", "a2ijax/model.py",
     "tokens = embedded + neighbor + center[:, None, :]",
     "tokens = embedded + neighbor + center[:, None, :] + jnp.sum(center, 0) / 50",
     ["tests/test_invariants.py::test_two_distant_copies_have_twice_the_energy",
      "tests/test_invariants.py::test_periodic_supercell_is_extensive"]),
    ("padding-atoms-as-neighbours", "8 padded atoms", "a2ijax/potential.py",
     "pair_mask = pair_mask & pick(mask)[:, None] & mask[j]",
     "pair_mask = pair_mask & pick(mask)[:, None]",
     ["tests/test_invariants.py::test_padded_atoms_contribute_nothing_and_have_finite_gradients"]),
    ("dtype-drift", "9 no recompilation", "a2ijax/md.py",
     "        return state, neighbor, records, bad",
     "        return state.set(position=state.position.astype(jnp.float32)), neighbor, records, bad",
     ["tests/test_md.py::test_no_recompilation_after_the_first_md_chunk"]),
    ("init-depends-on-the-system", "9 no recompilation", "a2ijax/potential.py",
     "return _init_program(model, key, R.shape[-1], jnp.result_type(R).name)",
     "return _init_program(model, jax.random.fold_in(key, R.shape[0]), R.shape[-1], jnp.result_type(R).name)",
     ["tests/test_invariants.py::test_init_gives_one_set_of_parameters_for_every_system_from_one_program"]),
    ("overflow-not-poisoned", "10 no silent truncation", "a2ijax/potential.py",
     "return energy * jnp.where(neighbor.did_buffer_overflow, jnp.nan, 1.0).astype(energy.dtype)",
     "return energy",
     ["tests/test_invariants.py::test_overflow_is_detected_and_reallocation_restores_the_energy"]),
    ("overflow-ignored-in-md", "10 no silent truncation", "a2ijax/md.py",
     "if bool(jnp.any(new_neighbor.did_buffer_overflow)):",
     "if False:",
     ["tests/test_md.py::test_overflow_in_a_chunk_reallocates_and_reruns_the_chunk"]),
    ("keys-weighted-to-the-cutoff", "15 attention range", "a2ijax/model.py",
     "c_keys = envelope(-minus_d / r_att, cfg.envelope, cfg.envelope_exponent)",
     "c_keys = _gather_slots(c, keys)",
     ["tests/test_invariants.py::test_attention_range_is_smooth_where_keys_fade_and_change_rank"]),
    ("farthest-keys", "15 attention range", "a2ijax/model.py",
     "minus_d, keys = jax.lax.top_k(-d, min(cfg.attention_keys, k))",
     "plus_d, keys = jax.lax.top_k(d, min(cfg.attention_keys, k)); minus_d = -plus_d",
     ["tests/test_invariants.py::test_attention_range_at_the_cutoff_is_full_attention"]),
    ("crowded-keys-truncated", "15 attention range", "a2ijax/model.py",
     "crowded = jnp.sum(d < r_att, -1) > cfg.attention_keys",
     "crowded = jnp.zeros(n, bool)",
     ["tests/test_invariants.py::test_more_neighbours_inside_the_attention_range_than_keys_is_nan"]),
    ("cell-list-skips-lower-cells", "5 host neighbour search = all pairs", "a2ijax/geometry.py",
     "for offset in itertools.product((-1, 0, 1), repeat=3):",
     "for offset in itertools.product((0, 1), repeat=3):",
     ["tests/test_geometry.py::test_cell_list_equals_all_pairs"]),
    ("box-check-real-probe-only", "errors: box too small", "a2ijax/potential.py",
     "real, fractional = maps_to_zero(lattice[:, axis]), maps_to_zero(np.eye(dim)[axis])",
     "real, fractional = maps_to_zero(lattice[:, axis]), False",
     ["tests/test_errors.py::test_box_check_holds_for_fractional_displacements"]),
    ("split-padding-rows-counted", "13 several devices", "a2ijax/potential.py",
     "        energies = jnp.where(real, energies, 0.0)\n",
     "",
     ["tests/test_parallel.py::test_atom_split_energy_forces_stress_and_per_atom_energies_equal_one_device"]),
    ("filler-rows-weighted", "13 several devices", "a2ijax/batching.py",
     'batch["weight"] = (np.arange(size) < len(rows)).astype(np.float32)',
     'batch["weight"] = np.ones(size, np.float32)',
     ["tests/test_parallel.py::test_split_batch_first_step_equals_one_device"]),
    ("committee-first-member-only", "17 committee", "a2ijax/committee.py",
     "return jnp.mean(jax.vmap(lambda p: energy_fn(p, R, neighbor=neighbor, **kwargs))(params))",
     "return jax.vmap(lambda p: energy_fn(p, R, neighbor=neighbor, **kwargs))(params)[0]",
     ["tests/test_committee.py::test_member_forces_are_each_models_own_the_mean_force_their_mean"]),
    ("disagreement-population-std", "17 committee", "a2ijax/committee.py",
     "jnp.var(forces, axis=0, ddof=1)", "jnp.var(forces, axis=0)",
     ["tests/test_committee.py::test_member_forces_are_each_models_own_the_mean_force_their_mean"]),
    ("attention-sink-unnormalised", "18 attention maps", "a2ijax/model.py",
     'self.sow("intermediates", "weights", e / denominator)',
     'self.sow("intermediates", "weights", e / jnp.sum(e, -1, keepdims=True))',
     ["tests/test_analysis.py::test_attention_weights_sum_to_one_minus_the_sink_and_vanish_beyond_the_cutoff"]),
    ("cells-miss-lower-neighbours", "12 linear-memory periodic list = host search", "a2ijax/neighbors.py",
     "np.meshgrid(*([np.arange(-1, 2)] * 3), indexing=\"ij\")",
     "np.meshgrid(*([np.arange(0, 2)] * 3), indexing=\"ij\")",
     ["tests/test_neighbors.py::test_same_pairs_as_the_host_search_in_every_box_shape"]),
    ("keys-counted-at-rebuilds-only", "15 key slots are a capacity", "a2ijax/neighbors.py",
     "        if r_att > 0:  # atoms move between rebuilds: count the keys at every update",
     "        if False:",
     ["tests/test_neighbors.py::test_key_slots_are_a_capacity_counted_at_every_update"]),
    ("strain-never-rebuilds", "12 a box that changes (NPT)", "a2ijax/neighbors.py",
     "stale = (moved + 0.5 * strain * reach > threshold)",
     "stale = (moved > threshold)",
     ["tests/test_neighbors.py::test_a_changing_box_is_followed_and_a_box_too_narrow_for_the_cells_is_named"]),
    ("reallocation-forgets-what-held", "10 a list grows until it holds", "a2ijax/neighbors.py",
     "else capacity\n        if code & PEC.CELL_SIZE_TOO_SMALL:  # a shrinking box: 10% thicker cells leave it room\n"
     "            kwargs.setdefault(\"cell_margin\", 1.1)\n        if not code & PEC.NEIGHBOR_LIST_OVERFLOW:\n"
     "            slots = neighbor.idx.shape[1]\n",
     "else 0\n        if code & PEC.CELL_SIZE_TOO_SMALL:\n            kwargs.setdefault(\"cell_margin\", 1.1)\n"
     "        if not code & PEC.NEIGHBOR_LIST_OVERFLOW:\n            slots = 0\n",
     ["tests/test_md.py::test_allocate_grows_a_list_too_small_for_its_atoms_until_it_holds_every_neighbour"]),
    ("lammps-ghost-centres-dropped", "LAMMPS forces exact on every rank", "a2ijax/lammps.py",
     "            centre[j[i < nlocal]] = True\n",
     "",
     ["tests/test_lammps.py::test_two_ranks_give_the_forces_and_the_trajectory_of_one"]),
    ("lammps-images-not-sent-home", "LAMMPS forces exact on one rank", "a2ijax/lammps.py",
     "            owner = order[np.searchsorted(tags[:nlocal], tags, sorter=order)]",
     "            owner = np.where(np.arange(n) < nlocal, np.arange(n), n)",
     ["tests/test_lammps.py::test_one_rank_lammps_run_is_the_a2ijax_md_run"]),
    ("lammps-virial-sign", "LAMMPS pressure", "a2ijax/export.py",
     "            return value, forces, -jnp.einsum(\"ia,ib->ab\", gradient, R)",
     "            return value, forces, jnp.einsum(\"ia,ib->ab\", gradient, R)",
     ["tests/test_lammps.py::test_one_rank_lammps_run_is_the_a2ijax_md_run"]),
    ("lammps-ranks-virial-sign", "LAMMPS pressure on several ranks", "a2ijax/export.py",
     "        return energy, forces, -strain_grad",
     "        return energy, forces, strain_grad",
     ["tests/test_lammps.py::test_two_ranks_give_the_forces_and_the_trajectory_of_one"]),
    ("energy-offset-in-float32", "float64 shift before float32", "a2ijax/batching.py",
     "        out.energy[row] = dataset.energy[index] - out.energy_offset[row]  # float64, then float32",
     "        out.energy[row] = np.float32(dataset.energy[index]) - np.float32(out.energy_offset[row])",
     ["tests/test_train.py::test_dft_scale_energies_are_not_at_the_float32_floor"]),
    ("learn-relabels", "19 active learning", "a2ijax/learn.py",
     "for i in chosen[len(done):]:", "for i in chosen:",
     ["tests/test_learn.py::test_two_rounds_add_exactly_the_selected_frames_and_resume_without_relabelling"]),
    ("learn-selects-least", "19 active learning", "a2ijax/learn.py",
     "return eligible[np.argsort(-score[eligible], kind=\"stable\")[:count]]",
     "return eligible[np.argsort(score[eligible], kind=\"stable\")[:count]]",
     ["tests/test_learn.py::test_two_rounds_add_exactly_the_selected_frames_and_resume_without_relabelling"]),
]


def run_fault(name, invariant, path, original, faulty, tests) -> list[tuple[str, bool]]:
    with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as tmp:
        for part in ("a2ijax", "tests", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / part)
        target = Path(tmp) / path
        text = target.read_text()
        if text.count(original) != 1:
            raise SystemExit(f"{name}: expected exactly one {original!r} in {path}, found {text.count(original)}")
        target.write_text(text.replace(original, faulty))
        env = dict(os.environ, PYTHONPATH=tmp)
        results = []
        for test in tests:
            # -m "": the slow-marked tests too (the default selection leaves them out, and a
            # deselected test would read as red).
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "",
                                   test],
                                  cwd=tmp, env=env, capture_output=True, text=True)
            results.append((test, proc.returncode != 0))
        return results


def main(argv: list[str]) -> int:
    selected = [f for f in FAULTS if not argv or any(a in f[0] for a in argv)]
    # Control: the same copy-and-run machinery without a fault must pass, or "caught" means nothing.
    first = selected[0]
    tests = sorted({t for f in selected for t in f[5]})
    failed = [t for t, red in run_fault("control", "none", first[2], first[3], first[3], tests) if red]
    if failed:
        print(f"control run failed without any fault: {failed}")
        return 2
    print(f"control  {len(tests)} tests pass on the unmodified copy", flush=True)
    escaped = 0
    for fault in selected:
        for test, caught in run_fault(*fault):
            escaped += not caught
            print(f"{'caught ' if caught else 'ESCAPED'}  invariant {fault[1]:<32} fault {fault[0]:<28} {test}",
                  flush=True)
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
