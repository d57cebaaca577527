"""Bad command-line input ends in a message naming the option, before any work starts."""

from __future__ import annotations

import pytest

from a2ijax import cli, quickstart, sampling
from a2ijax.sampling import SamplingConfig

# (command line before the option, option, values that must be refused)
CASES = [
    (["demo"], "--n-atoms", ["0", "-5", "1e9", "99999999999"]),
    (["demo"], "--steps", ["0", "-1"]),
    (["demo"], "--dt", ["0", "-0.1", "nan", "inf"]),
    (["generate", "lj", "--out", "x.xyz"], "--frames-per-point", ["0", "-3"]),
    (["generate", "lj", "--out", "x.xyz"], "--stride", ["0", "-1"]),
    (["generate", "lj", "--out", "x.xyz"], "--equilibration", ["-1"]),
    (["generate", "lj", "--out", "x.xyz"], "--segment-frames", ["0"]),
    (["train", "c.toml"], "--stop-after", ["0", "-2"]),
    (["train", "c.toml"], "--atom-chunk", ["-1", "x"]),
    (["evaluate", "run", "d.xyz"], "--batch-size", ["0"]),
    (["md", "run", "--state-point", "p"], "--steps", ["0", "-10"]),
    (["md", "run", "--state-point", "p"], "--thermo-every", ["0"]),
    (["md", "run", "--state-point", "p"], "--trajectory-every", ["0"]),
    (["md", "run", "--state-point", "p"], "--dt", ["0", "-1", "nan"]),
    (["md", "run", "--state-point", "p"], "--kT", ["-1", "inf"]),
    (["md", "run", "--state-point", "p"], "--skin", ["-0.1"]),
    (["md", "run", "--state-point", "p"], "--capacity-multiplier", ["0", "-1"]),
    (["md", "run", "--state-point", "p"], "--equilibrate", ["-1"]),
    (["bench"], "--sizes", ["0", "-256", "100000000"]),
    (["bench"], "--chunk", ["0"]),
    (["bench"], "--repeats", ["0"]),
    (["bench"], "--skin", ["-1"]),
    (["bench"], "--max-chunk-s", ["0"]),
]


@pytest.mark.parametrize("prefix,option,values", CASES, ids=[f"{c[0][0]} {c[1]}" for c in CASES])
def test_numeric_options_are_checked_when_parsed(prefix, option, values, capsys):
    for value in values:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*prefix, f"{option}={value}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}" in err and "Traceback" not in err, err


def test_sampling_settings_are_checked_before_any_md(monkeypatch, capsys, tmp_path):
    def no_md(*args, **kwargs):
        raise AssertionError("MD ran before the settings were checked")

    monkeypatch.setattr(sampling, "sample_state_point", no_md)
    out = str(tmp_path / "x.xyz")
    # 4 frames in segments of 2: only 2 segments for 3 splits.
    assert cli.main(["generate", "lj", "--out", out, "--frames-per-point", "4", "--segment-frames", "2"]) == 2
    assert "need at least 3 segments" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"leave no training segment of 4"):
        sampling.generate("lj", SamplingConfig(frames_per_point=4, segment_frames=1, split_fractions=(0.0, 0.5, 0.5)),
                          progress=False)
    with pytest.raises(ValueError, match="friction must be positive"):
        SamplingConfig(friction=0.0)


def test_md_output_steps_are_checked_before_equilibration(monkeypatch, capsys, tmp_path):
    from a2ijax import trained_md

    monkeypatch.setattr(trained_md, "sample_state_point", lambda *a, **k: pytest.fail("equilibrated first"))
    monkeypatch.setattr(trained_md, "load_potential", lambda *a, **k: pytest.fail("loaded a checkpoint first"))
    assert cli.main(["md", str(tmp_path), "--state-point", "rho0.84_T0.85", "--steps", "25",
                     "--thermo-every", "10"]) == 2
    assert "must be multiples of thermo_every (10)" in capsys.readouterr().err


def test_quickstart_never_deletes_an_earlier_run_unasked(tmp_path, capsys):
    marker = tmp_path / "run" / "checkpoints" / "keep.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("a run someone wants")
    assert cli.main(["quickstart", "--out", str(tmp_path)]) == 2
    assert "already holds a training run: pass --overwrite" in capsys.readouterr().err
    assert marker.read_text() == "a run someone wants"
    with pytest.raises(ValueError, match="already holds a training run"):
        quickstart.quickstart(tmp_path)
