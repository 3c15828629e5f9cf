"""Rebuild the model zoo (models/zoo) from scratch, deterministically.

    python models/build/build_zoo.py --tf-python /opt/tfbuild/bin/python

Two steps, two Pythons: training and conversion run under a Python with
TensorFlow and scikit-learn (``--tf-python``; ``pip install -e .[build-models]``
gives one), as a subprocess (models/build/train.py); packaging runs here,
under lepton's own environment: each .tflite is copied into
``models/zoo/<name>/``, its tensors are read from the file, its metrics are
measured on the held-out split with the shipped runtime through the
manifest's own pre/post-processing, and its manifest is signed with the zoo
key (``models/.zoo-signing.key``, generated if missing; the public half is
``models/zoo/zoo.pub``). ``models/zoo/SHA256SUMS`` records every artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lepton.models.evaluate import evaluate_runner
from lepton.models.manifest import MANIFEST_NAME, MODEL_NAME, build_manifest, load_manifest, write_manifest
from lepton.models.runner import ModelRunner
from lepton.models.signing import generate_keypair, key_id, load_private_key, sign_manifest
from lepton.models.registry import Registry, zoo_dir

from cryptography.hazmat.primitives import serialization  # noqa: E402 - after lepton, which needs it anyway

log = logging.getLogger("build_zoo")

BUILD_DIR = Path(__file__).resolve().parent
MODELS_DIR = BUILD_DIR.parent
KEY_PATH = MODELS_DIR / ".zoo-signing.key"
FAMILIES = ("digits", "vibration", "mobilenet")
MAX_ZOO_BYTES = 15 * 1000 * 1000


def ensure_key(key_path: Path, public_path: Path) -> tuple[object, bool]:
    """(private key, True if it was just generated); zoo.pub always matches the private key."""
    fresh = not key_path.exists()
    if fresh:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        generate_keypair(key_path, public_path, overwrite=True)
        log.warning("generated a new zoo signing key %s; every zoo manifest is re-signed with it", key_path)
    key = load_private_key(key_path)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not public_path.exists() or public_path.read_bytes() != pem:
        public_path.write_bytes(pem)
        fresh = True
    return key, fresh


def train(tf_python: str, families: list[str], work: Path) -> None:
    """Run models/build/train.py under the TensorFlow Python."""
    cmd = [tf_python, str(BUILD_DIR / "train.py"), *families, "--out", str(work)]
    log.info("training: %s", " ".join(cmd))
    if subprocess.run(cmd, check=False).returncode != 0:
        raise SystemExit(f"training failed: {' '.join(cmd)}")


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float))}


def package(info: dict, family_dir: Path, zoo: Path, version: str, key) -> Path:
    """Copy one trained model into the zoo, measure it, write and sign its manifest."""
    name = info["name"]
    target = zoo / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copyfile(family_dir / info["file"], target / MODEL_NAME)
    spec = {k: info[k] for k in ("family", "variant", "task", "preprocess", "postprocess", "trained", "notes")}
    spec["labels"] = info.get("labels", [])
    spec["heldout"] = info.get("heldout", "")
    manifest = build_manifest(target / MODEL_NAME, name, version, spec)
    metrics = _numbers(info.get("train_metrics", {}))
    metrics.pop("keras_accuracy", None)  # the figure that counts is the shipped file's, measured below
    if manifest.heldout:
        runner = ModelRunner(target / MODEL_NAME, manifest.preprocess, manifest.postprocess, manifest.labels,
                             name=name, version=version)
        measured = evaluate_runner(runner, family_dir / manifest.heldout, manifest.postprocess.kind)
        measured.pop("invoke_ms_median", None)  # a timing, not a quality metric; `lepton models bench` measures it
        metrics.update(_numbers(measured))
    signed = sign_manifest(manifest.model_copy(update={"metrics": metrics}), key)
    write_manifest(signed, target / MANIFEST_NAME)
    log.info("%s: %s", name, json.dumps(metrics, sort_keys=True))
    return target


def resign_others(zoo: Path, rebuilt: set[str], key) -> None:
    """After a key change, re-sign the manifests of models that were not rebuilt."""
    for path in sorted(zoo.glob(f"*/{MANIFEST_NAME}")):
        manifest = load_manifest(path)
        if manifest.name not in rebuilt:
            write_manifest(sign_manifest(manifest, key), path)
            log.info("re-signed %s", path)


def write_sums(zoo: Path) -> int:
    """SHA256SUMS over every artifact (models, held-out data, public key); returns total bytes."""
    files = sorted(p for p in zoo.rglob("*") if p.is_file() and p.suffix in (".tflite", ".npz", ".pub", ".json")
                   and p.name != "bench.json")
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(zoo).as_posix()}" for p in files]
    (zoo / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return sum(p.stat().st_size for p in files)


def build(families: list[str], tf_python: str | None, version: str, zoo: Path, work: Path) -> None:
    """Train (unless ``tf_python`` is None: package what ``work`` holds), package, sign, checksum, verify."""
    key, fresh = ensure_key(KEY_PATH, zoo / "zoo.pub")
    if tf_python:
        train(tf_python, families, work)
    rebuilt = set()
    for family in families:
        record = json.loads((work / family / f"{family}.json").read_text())
        for info in record["models"]:
            package(info, work / family, zoo, version, key)
            rebuilt.add(info["name"])
        heldout = work / family / "heldout.npz"
        if heldout.exists():
            shutil.copyfile(heldout, zoo / family / "heldout.npz")
    if fresh:
        resign_others(zoo, rebuilt, key)
    total = write_sums(zoo)
    failures = [(e.label(), reason) for e, reason in Registry(zoo, [zoo / "zoo.pub"]).verify_all() if reason]
    if failures:
        raise SystemExit(f"zoo does not verify: {failures}")
    log.info("zoo: %d bytes in %s, signed by key %s", total, zoo, key_id(key.public_key()))
    if total > MAX_ZOO_BYTES:
        raise SystemExit(f"zoo is {total} bytes, over the {MAX_ZOO_BYTES} byte budget")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild the model zoo: train (TensorFlow), package, measure, sign.")
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help=f"families to rebuild (default: all: {', '.join(FAMILIES)})")
    parser.add_argument("--tf-python", default=sys.executable, help="a Python with tensorflow and scikit-learn")
    parser.add_argument("--version", default="1.0.0", help="version written into every rebuilt manifest")
    parser.add_argument("--zoo", type=Path, default=zoo_dir(), help="output zoo directory (default models/zoo)")
    parser.add_argument("--work", type=Path, help="keep the training output here (default: a temporary directory)")
    parser.add_argument("--no-train", action="store_true", help="package what --work already holds, without training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families: {', '.join(sorted(unknown))}")
    args.zoo.mkdir(parents=True, exist_ok=True)
    if args.no_train and not args.work:
        parser.error("--no-train needs --work DIR holding a previous training output")
    if args.work:
        build(args.families, None if args.no_train else args.tf_python, args.version, args.zoo, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="lepton-zoo-") as work:
            build(args.families, args.tf_python, args.version, args.zoo, Path(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
