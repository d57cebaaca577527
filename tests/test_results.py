"""docs/results.md is the one place the project's figures are stated, and it is generated: it must
equal what experiments/results.py makes of its sources (the shipped models' reports, docs/data/)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def results_module():
    spec = importlib.util.spec_from_file_location("results", ROOT / "experiments" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_document_is_generated_from_its_sources():
    results = results_module()
    assert (ROOT / "docs" / "results.md").read_text() == results.document(), (
        "docs/results.md is out of date with its sources: run python experiments/results.py")


def test_every_shipped_model_and_recorded_experiment_has_its_section():
    text = (ROOT / "docs" / "results.md").read_text()
    for model in sorted(p.name for p in (ROOT / "a2ijax" / "models").iterdir() if (p / "report.json").is_file()):
        assert f"### `{model}`" in text
    sections = {"md_memory.json": "## MD at scale", "bench.json": "## Speed", "lammps_speed.json": "## LAMMPS",
                "md_checks.json": "## MD with the shipped models", "fresh_clone.json": "## A fresh clone",
                "notebooks_full.json": "## The notebooks in full mode",
                "radial_floor.json": "## The radial basis's least-squares floor",
                "active_learning.json": "## Active learning"}
    for name, heading in sections.items():
        if (ROOT / "docs" / "data" / name).is_file():
            assert heading in text, name
