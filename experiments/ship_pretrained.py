"""Ships a training run as a pretrained model of the package (``a2ijax/models/<name>/``).

    python experiments/ship_pretrained.py lj runs/lj experiments/configs/lj.toml

Writes the run's best checkpoint (EMA parameters), its metadata, its test report and the commands
that made it (``a2ijax generate <system> --out <data path>``, ``a2ijax train <config> --workdir
<run>``) with :func:`a2ijax.pretrained.export`. ``tests/test_pretrained.py`` then checks the model
against the report on freshly sampled frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from a2ijax import pretrained
from a2ijax.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the model's name, the reference system: lj, sw or ka")
    parser.add_argument("run", help="the training run's work directory")
    parser.add_argument("config", help="the config it was trained with")
    args = parser.parse_args()
    config = load_config(args.config)
    commands = [f"a2ijax generate {args.name} --out {config.data.path}",
                f"a2ijax train {args.config} --workdir {args.run}"]
    out = pretrained.export(args.run, pretrained.MODELS / args.name, commands)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"wrote {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
