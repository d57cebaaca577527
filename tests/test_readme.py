"""The README's usage examples run as written (documentation that drifts is a bug)."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from a2ijax.systems import lattice_positions

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_examples_run_in_order():
    """The jax-md example (an untrained two-species model), then the shipped model stepped by md.run,
    in one namespace as a reader would run them; forces non-trivial, the MD run moved the atoms."""
    first, second = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:2]
    box = 6.0
    names = dict(box=box, R=lattice_positions(100, box, jitter=0.05), species=jnp.arange(100) % 2)
    exec(first, names)
    assert names["E"].shape == () and np.isfinite(names["E"])
    assert names["F"].shape == (100, 3) and float(jnp.max(jnp.abs(names["F"]))) > 0
    start = np.asarray(names["R"])
    exec(second, names)
    end = np.asarray(names["result"].state.position)
    assert np.all(np.isfinite(end)) and names["result"].reallocations >= 0
    d = end - start
    d -= box * np.round(d / box)
    assert float(np.max(np.abs(d))) > 0.05
