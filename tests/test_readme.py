"""The README's usage example runs as written (documentation that drifts is a bug)."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from a2ijax.systems import lattice_positions


def test_readme_usage_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    box = 6.0
    names = dict(box=box, R=lattice_positions(100, box, jitter=0.05), species=jnp.arange(100) % 2, dt=0.002)
    exec(example, names)
    assert names["E"].shape == () and np.isfinite(names["E"])
    assert names["F"].shape == (100, 3) and float(jnp.max(jnp.abs(names["F"]))) > 0
    assert callable(names["apply"])
