"""The active-learning loop: two tiny rounds, exactly the selected frames added, resumed without relabelling."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from conftest import tiny_config

from a2ijax import cli
from a2ijax.dataset import read_dataset, write_dataset
from a2ijax.learn import LearnConfig, learn, load_learn_config, reference_labeller, select


class Interrupted(Exception):
    pass


@pytest.mark.slow  # two committees trained: about 2 minutes of one worker (python -m pytest -m slow)
def test_two_rounds_add_exactly_the_selected_frames_and_resume_without_relabelling(tiny_data, trained, tmp_path):
    """Round 0 trains a committee, runs its MD, selects and labels two frames (interrupted after the
    first and resumed); round 1 trains on the grown set. Run a third time, nothing is redone."""
    # The suite's tiny data (jittered lattices at density 0.8), named after the LJ state point at that
    # density: the committee trains on the shapes the suite has compiled already.
    frames = ase.io.read(tiny_data, index=":")
    for atoms in frames:
        atoms.info["state_point"] = "rho0.80_T2.0"
    write_dataset(tmp_path / "start.xyz", frames)
    config = tiny_config(tmp_path / "start.xyz", eval_every=24, checkpoint_every=24)  # the suite's programs
    # Short MD from a training frame: its candidates keep the neighbour capacity, so round 1's committee
    # trains on the programs round 0 compiled.
    settings = LearnConfig(system="lj", rounds=1, members=2, frames_per_round=2, md_steps=10, candidate_every=2)
    reference = reference_labeller("lj")
    calls = []

    def labeller(atoms):
        calls.append(atoms.get_positions().copy())
        if len(calls) == 2:  # the second frame: stop, as a killed run would
            raise Interrupted
        return reference(atoms)

    workdir = tmp_path / "run"
    with pytest.raises(Interrupted):
        learn(config, settings, workdir, labeller=labeller)
    curve = learn(config, settings, workdir, labeller=labeller)
    assert len(calls) == 3  # two frames labelled once each, the interrupted one again
    np.testing.assert_array_equal(calls[2], calls[1])
    assert float(np.max(np.abs(calls[1] - calls[0]))) > 0
    assert [row["train_frames"] for row in curve] == [20, 22]
    labelled = read_dataset(workdir / "labelled.xyz")
    assert len(labelled) == len(frames) + 2
    for r in range(1):
        selected = json.loads((workdir / f"round_{r}" / "selected.json").read_text())
        candidates = ase.io.read(workdir / f"round_{r}" / "candidates.extxyz", index=":")
        assert len(candidates) == 5  # one state point, 10 steps, one candidate every 2
        score = [a.info["disagreement"] for a in candidates]
        assert selected["selected"] == list(np.argsort(score)[::-1][:2])  # the largest disagreement first
        added = [i for i, info in enumerate(labelled.info) if info.get("added_in_round") == r]
        assert len(added) == 2
        for i, c in zip(added, selected["selected"], strict=True):
            assert labelled.info[i]["split"] == "train" and labelled.info[i]["candidate"] == c
            np.testing.assert_allclose(labelled.positions[i], candidates[c].positions, atol=1e-7)
            # Labelled by the reference: its own forces on those positions.
            np.testing.assert_allclose(labelled.forces[i], reference(candidates[c]).get_forces(), rtol=1e-6, atol=1e-6)
    assert learn(config, settings, workdir, labeller=labeller) == curve and len(calls) == 3  # all done: nothing redone


def test_selection_takes_the_largest_disagreement_within_the_trust_level():
    score = np.array([3.0, 9.0, 1.0, 7.0, 5.0])
    settings = LearnConfig(system="lj", frames_per_round=2)
    assert select(score, settings, 0).tolist() == [1, 3]
    assert select(score, LearnConfig(system="lj", frames_per_round=2, max_disagreement=6.0), 0).tolist() == [4, 0]
    assert select(score, LearnConfig(system="lj", frames_per_round=9, max_disagreement=2.0), 0).tolist() == [2]
    drawn = select(score, LearnConfig(system="lj", frames_per_round=3, selection="random", max_disagreement=6.0), 1)
    assert sorted(drawn.tolist()) == [0, 2, 4]


def test_learn_config_is_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\[learn\] system must be one of"):
        LearnConfig(system="argon")
    with pytest.raises(ValueError, match="multiple of candidate_every"):
        LearnConfig(system="lj", md_steps=30, candidate_every=20)
    (tmp_path / "c.toml").write_text('[data]\npath = "x.xyz"\n[learn]\nsystem = "lj"\nmembers = 1\n')
    with pytest.raises(ValueError, match=r"c.toml: \[learn\] members must be >= 2"):
        load_learn_config(tmp_path / "c.toml")
    assert cli.main(["learn", str(tmp_path / "c.toml")]) == 2
    assert "members must be >= 2" in capsys.readouterr().err


def test_any_ase_calculator_labels_frames(tiny_data):
    """``calculator_labeller``: ASE's own Lennard-Jones gives the reference's LJ labels (same sigma,
    epsilon, cutoff and energy shift)."""
    from ase.calculators.lj import LennardJones

    from a2ijax.learn import calculator_labeller

    atoms = ase.io.read(tiny_data, index="0")
    reference = reference_labeller("lj")(atoms)
    labelled = calculator_labeller(LennardJones(sigma=1.0, epsilon=1.0, rc=2.5, smooth=False))(atoms)
    np.testing.assert_allclose(labelled.get_forces(), reference.get_forces(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(labelled.get_potential_energy(), reference.get_potential_energy(), rtol=1e-9)
