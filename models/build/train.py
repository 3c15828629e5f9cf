"""Train zoo model families and convert them to .tflite (run under TensorFlow).

    /opt/tfbuild/bin/python models/build/train.py digits vibration mobilenet --out DIR

Each family writes ``<name>.tflite`` files, a held-out split where it has one,
and ``<family>.json`` describing them; ``build_zoo.py`` runs this and packages
the result (manifests, metrics measured with the shipped runtime, signatures).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tfcommon import seed_everything  # noqa: E402

FAMILIES = {"digits": "train_digits", "vibration": "train_vibration", "mobilenet": "train_mobilenet"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="+", choices=sorted(FAMILIES), help="model families to build")
    parser.add_argument("--out", required=True, type=Path, help="directory for the .tflite files and records")
    args = parser.parse_args(argv)
    for family in args.families:
        seed_everything()  # per family, so building one alone gives the same weights as building all
        module = importlib.import_module(FAMILIES[family])
        module.build(args.out / family)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
