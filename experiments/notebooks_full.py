"""Runs the notebooks in full mode (without ``A2IJAX_NOTEBOOK_QUICK``), as a user would, and records
each one's figures (the ``figures`` dict its checks cell defines), its wall time and whether its
checks passed:

    python experiments/notebooks_full.py --out runs/notebooks_full.json             # all
    python experiments/notebooks_full.py 03 04 --out runs/notebooks_full.json       # by number

Each notebook runs in a fresh kernel through nbclient (the suite's quick-mode test runs them the same
way), in a scratch directory for the files it writes. One at a time, on a free CPU: some take tens of
minutes. The JSON is rewritten after every notebook; copy it to ``docs/data/notebooks_full.json`` with
a ``recorded`` note and run ``python experiments/results.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "A2IJAX_FIGURES "


def run(path: Path, timeout: int) -> dict:
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = jupytext.read(path)
    notebook.cells.append(nbformat.v4.new_code_cell(f"import json\nprint({MARK!r} + json.dumps(figures))"))
    row = dict(notebook=path.name)
    with tempfile.TemporaryDirectory() as work:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": work}})
        t0 = time.perf_counter()
        try:
            client.execute()
            row["checks"] = "passed"
        except CellExecutionError as error:
            row["checks"] = "failed: " + (str(error).strip().splitlines() or ["?"])[-1][:300]
        row["seconds"] = time.perf_counter() - t0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            for line in output.get("text", "").splitlines():
                if line.startswith(MARK):
                    row["figures"] = json.loads(line[len(MARK):])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("numbers", nargs="*", help="notebook numbers (01, 02, ...); none: all")
    parser.add_argument("--out", default="runs/notebooks_full.json")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = parser.parse_args()
    paths = sorted(p for p in (ROOT / "notebooks").glob("[0-9]*.py") if not args.numbers
                   or p.name.split("_")[0] in args.numbers)
    os.environ.pop("A2IJAX_NOTEBOOK_QUICK", None)  # the kernels inherit this environment
    os.environ.setdefault("MPLBACKEND", "Agg")
    import jax

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(command=" ".join(["python", "experiments/notebooks_full.py", *sys.argv[1:]]),
                  date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), jax=jax.__version__, rows=[])
    for path in paths:
        row = run(path, args.timeout)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
