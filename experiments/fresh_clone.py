"""Times the README's two commands in a fresh clone, as CI (``.ci/run``) runs them.

Clones the repository's committed HEAD into ``--dir`` (removed first), then runs the README's first
command in its two parts (install; ``a2ijax quickstart``) and its second (the test suite), each
timed, in one shell each, and writes the steps, their seconds and outcomes, and the quickstart's
figures (its ``quickstart/summary.json``), as JSON:

    python experiments/fresh_clone.py --out runs/fresh_clone.json

Run it on a free CPU (the suite's time halves with a second job beside it); copy the JSON to
``docs/data/fresh_clone.json`` with a ``recorded`` note and run ``python experiments/results.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

from a2ijax.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = " && a2ijax quickstart"


def readme_commands() -> list[str]:
    """The README's first code block: the two commands, exactly as written."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [line for line in block.group(1).splitlines() if line.strip()] if block else []
    if len(commands) != 2 or not commands[0].endswith(QUICKSTART):
        raise SystemExit(f"README.md does not start with the two commands this script times: {commands}")
    return commands


def clean_environment() -> dict[str, str]:
    """This process's environment without its virtual environment or JAX and XLA settings, CI=true."""
    env = {k: v for k, v in os.environ.items()
           if k != "VIRTUAL_ENV" and not k.startswith(("JAX_", "XLA_", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in Path(p).parts)
    env["CI"] = "true"
    return env


def last_line(text: str, pattern: str) -> str:
    lines = [line.strip() for line in text.splitlines() if re.search(pattern, line)]
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/a2ijax-fresh-clone", help="where to clone (removed first)")
    parser.add_argument("--out", default="runs/fresh_clone.json")
    args = parser.parse_args()

    first, tests = readme_commands()
    install = first[: -len(QUICKSTART)]
    steps = [(install, None), (". .venv/bin/activate && a2ijax quickstart", None),
             (tests, r"passed|failed|error")]
    where = Path(args.dir)
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True).stdout.strip()
    rows = []
    for command, summary in steps:
        t0 = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=where, capture_output=True, text=True,
                              env=clean_environment())
        seconds = time.perf_counter() - t0
        text = done.stdout + done.stderr
        outcome = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        if summary and last_line(text, summary):
            outcome += f": {last_line(text, summary)}"
        rows.append(dict(step=command, seconds=seconds, outcome=outcome))
        print(f"{seconds:8.1f} s  {outcome}  <- {command}", flush=True)
        if done.returncode:
            print(text[-4000:])
            break
    summary = where / "quickstart" / "summary.json"
    quickstart = json.loads(summary.read_text()) if summary.is_file() else None
    out = Path(args.out)
    record = dict(command="python experiments/fresh_clone.py", commit=head, date=time.strftime("%Y-%m-%d %H:%M"),
                  machine=platform.machine(), rows=rows, quickstart=quickstart)
    atomic_write(out, lambda f: f.write(json.dumps(record, indent=1) + "\n"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
