"""``lepton models``: list, inspect, add, verify, keygen, sign, bench, eval.

Thin: each command parses, calls the library (registry, signing, bench,
evaluate) and prints; library errors (ModelError, ConfigError) become one
line in ``lepton.cli``. Every read command takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lepton.errors import ConfigError, ModelError

REGISTRY_HELP = "registry directory (default: $LEPTON_MODELS_DIR, else the shipped zoo)"
KEY_HELP = "trusted public key (PEM); repeat for several (default: the zoo key)"


def register(subparsers) -> None:
    """Add ``lepton models ...`` to the ``lepton`` parser."""
    p = subparsers.add_parser(
        "models", help="model registry: list, inspect, add, verify, keygen, sign, bench, eval",
        description="The model registry: signed manifests beside .tflite files. The shipped zoo (digits, "
        "vibration, mobilenet96/224) is the default registry.",
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    _add_list(sub)
    _add_inspect(sub)
    _add_add(sub)
    _add_verify(sub)
    _add_keygen(sub)
    _add_sign(sub)
    _add_bench(sub)
    _add_eval(sub)


def _command(sub, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A ``lepton models NAME`` subparser that runs *func*."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p


def _common(p, registry: bool = True, keys: bool = True, as_json: bool = True) -> None:
    """The options most commands share, in this order: --registry, --key, --json."""
    if registry:
        p.add_argument("--registry", metavar="DIR", help=REGISTRY_HELP)
    if keys:
        p.add_argument("--key", metavar="PUB", action="append", help=KEY_HELP)
    if as_json:
        p.add_argument("--json", action="store_true", help="print JSON")


def _add_list(sub) -> None:
    p = _command(sub, "list", cmd_list, help="every model version in the registry and whether it verifies",
                 description="List the registry's model versions: task, size, memory estimate, measured "
                 "metrics, and whether each one verifies (signature, size, sha256).")
    _common(p)


def _add_inspect(sub) -> None:
    p = _command(sub, "inspect", cmd_inspect,
                 help="a model's manifest, tensors and verification, or a .tflite's metadata",
                 description="Show one model: NAME (newest version in the registry; NAME==VERSION for "
                 "another), a manifest.json or its directory, or a bare .tflite file (its tensors, read "
                 "from the file).")
    p.add_argument("target", metavar="NAME|PATH")
    _common(p)


def _add_add(sub) -> None:
    p = _command(sub, "add", cmd_add, help="describe, sign and install a .tflite as a new model version",
                 description="Read the tensors, size and sha256 from PATH, combine them with SPEC "
                 "(preprocess, postprocess; optionally family, variant, task, labels, metrics, trained, "
                 "notes), sign the manifest with KEY and install both atomically as "
                 "<registry>/<name>/<version>/. Refused if the version is older than one the registry "
                 "already trusts.")
    p.add_argument("path", metavar="PATH", help="the .tflite file")
    p.add_argument("--name", required=True, help="model name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
    p.add_argument("--version", required=True, help="PEP 440 version, e.g. 1.2.0")
    p.add_argument("--spec", required=True, metavar="SPEC.json",
                   help="JSON: preprocess and postprocess (required), and optionally family, variant, task, "
                   "labels, metrics, trained, notes; the zoo's manifests show every field (models/README.md)")
    p.add_argument("--key", required=True, metavar="KEY", help="Ed25519 private key (PEM) to sign with")
    p.add_argument("--trust", metavar="PUB", action="append", help="trust this public key when checking "
                   "the versions already installed; repeat for several (default: the zoo key); KEY's own "
                   "public key is always trusted")
    _common(p, keys=False)


def _add_verify(sub) -> None:
    p = _command(sub, "verify", cmd_verify, help="check signatures, sizes and hashes (exit 1 if anything fails)",
                 description="Verify every model version (or all versions of NAME): the manifest parses, "
                 "a trusted key signed it, and the file's size and sha256 match. Exit 0 if all pass, 1 "
                 "with the failed check named for each one that does not, or if there is nothing to verify.")
    p.add_argument("name", nargs="?", help="only this model")
    _common(p)


def _add_keygen(sub) -> None:
    p = _command(sub, "keygen", cmd_keygen, help="create an Ed25519 signing key pair",
                 description="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public). Devices trust "
                 "the .pub; keep the .key off them.")
    p.add_argument("--out", required=True, metavar="PREFIX", help="path prefix, e.g. keys/fleet")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    _common(p, registry=False, keys=False)


def _add_sign(sub) -> None:
    p = _command(sub, "sign", cmd_sign, help="sign (or re-sign) a manifest in place",
                 description="Sign MANIFEST with KEY, after checking that the model file beside it has the "
                 "manifest's size and sha256.")
    p.add_argument("manifest", metavar="MANIFEST", help="a manifest.json")
    p.add_argument("--key", required=True, metavar="KEY", help="Ed25519 private key (PEM)")
    _common(p, registry=False, keys=False)


def _add_bench(sub) -> None:
    p = _command(sub, "bench", cmd_bench, help="invoke time p50/p95/p99 and throughput; saved as the compute profile",
                 description="Benchmark a model's invoke time on this machine (a realistic input through "
                 "its own preprocessing). The result is written as bench.json beside the manifest: the "
                 "compute profile the coordinator assumes until devices report measured times.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="interpreter threads (default 1)")
    p.add_argument("--iterations", type=int, default=200, metavar="N", help="timed invocations (default 200)")
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed invocations first (default 10)")
    p.add_argument("--out", metavar="FILE", help="write the profile here instead of beside the manifest")
    p.add_argument("--no-save", action="store_true", help="measure and print only")
    _common(p)


def _add_eval(sub) -> None:
    p = _command(sub, "eval", cmd_eval, help="measure accuracy (or precision/recall) on the held-out split, now",
                 description="Run NAME (or every model of the family NAME, e.g. digits) on the held-out "
                 "split its build saved, through the manifest's pre/post-processing and the runtime, and "
                 "print what it measures now next to what the manifest states.")
    p.add_argument("name", metavar="NAME|FAMILY", help="a family (all its models), a model, or NAME==VERSION")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="interpreter threads (default 1)")
    _common(p)


# -- helpers -------------------------------------------------------------------


def _registry(args):
    from lepton.models.registry import Registry

    root = _registry_root(args)
    if not root.is_dir():
        raise ConfigError(f"--registry {root}: not a directory")
    keys = getattr(args, "key", None)
    return Registry(root, trusted_keys=[Path(k) for k in keys] if keys else None)


def _registry_root(args) -> Path:
    """--registry, else $LEPTON_MODELS_DIR, else the shipped zoo."""
    from lepton.models.registry import ENV_DIR, zoo_dir

    return Path(args.registry or os.environ.get(ENV_DIR) or zoo_dir())


def _entry(registry, name: str):
    """One entry: the newest version of NAME, or NAME==VERSION."""
    return _resolve(registry, name)[0] if "==" in name else registry.get(name)


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, allow_nan=False)
    sys.stdout.write("\n")


def _entry_json(entry, problem: str | None) -> dict:
    m = entry.manifest
    return {"name": m.name, "version": m.version, "family": m.family, "variant": m.variant, "task": m.task,
            "path": str(entry.path), "size": m.size, "sha256": m.sha256, "memory_mb": m.memory_mb,
            "trained": m.trained, "metrics": m.metrics, "verified": problem is None, "problem": problem}


def _metric_text(metrics: dict) -> str:
    keys = [k for k in ("accuracy", "precision", "recall") if k in metrics]
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys) or "-"


def _progress(total: int, label: str):
    """A rich progress bar on stderr (only on a terminal); returns (progress, advance)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=not console.is_terminal)
    task = progress.add_task(label, total=total)
    return progress, (lambda n: progress.advance(task, n))


def _resolve(registry, name: str) -> list:
    """Entries for a family (newest version of each member), a model NAME, or NAME==VERSION."""
    name, _, version = name.partition("==")
    entries = registry.list()
    members = sorted({e.name for e in entries if e.manifest.family == name})
    if members and not version:
        return [registry.get(member) for member in members]
    if any(e.name == name for e in entries):
        return [registry.get(name, version or None)]
    have = ", ".join(sorted({e.name for e in entries})) or "none"
    raise ModelError(f"no model or family named {name!r} in registry {registry.root} (models: {have})")


# -- commands ------------------------------------------------------------------


def cmd_list(args) -> int:
    registry = _registry(args)
    entries, problems = registry.scan()
    checked = registry.check(entries)
    if args.json:
        _print_json({"registry": str(registry.root), "models": [_entry_json(e, p) for e, p in checked],
                     "problems": [{"manifest": str(path), "problem": why} for path, why in problems]})
        return 0
    print(f"{'NAME':<16} {'VERSION':<9} {'TASK':<15} {'SIZE':>10} {'MEM MB':>7} {'TRAINED':<7} {'METRICS':<34} STATUS")
    for entry, problem in checked:
        m = entry.manifest
        status = "ok" if problem is None else "FAILED"
        print(f"{m.name:<16} {m.version:<9} {m.task:<15} {m.size:>10} {m.memory_mb:>7.1f} {str(m.trained).lower():<7} "
              f"{_metric_text(m.metrics):<34} {status}")
    for _, problem in checked:
        if problem is not None:
            print(f"FAILED: {problem}", file=sys.stderr)
    for path, why in problems:
        print(f"unreadable manifest {path}: {why}", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from lepton.models.manifest import MANIFEST_NAME, load_manifest
    from lepton.models.registry import Entry

    target = Path(args.target)
    registry = _registry(args)
    if target.suffix == ".tflite" and target.is_file():
        return _inspect_tflite(target, args.json)
    if not target.exists() and ("/" in args.target or target.suffix in (".tflite", ".json")):
        raise ConfigError(f"{args.target}: file not found")  # a path, not a registry name
    if target.exists():
        manifest_path = target / MANIFEST_NAME if target.is_dir() else target
        manifest = load_manifest(manifest_path)
        entry = Entry(manifest, manifest_path.parent / manifest.file, manifest_path)
    else:
        entry = _entry(registry, args.target)
    try:
        registry.verify(entry)
        problem = None
    except ModelError as exc:
        problem = str(exc)
    from lepton.models.bench import read_profile

    data = {**json.loads(entry.manifest.to_json()), "path": str(entry.path),
            "manifest_path": str(entry.manifest_path), "verified": problem is None, "problem": problem,
            "bench": read_profile(entry)}
    if args.json:
        _print_json(data)
    else:
        _print_entry(entry, data, problem)
    return 0


def _print_entry(entry, data: dict, problem: str | None) -> None:
    m = entry.manifest
    print(f"{m.name} {m.version}  ({m.family}/{m.variant}, {m.task}){'' if m.trained else '  UNTRAINED'}")
    print(f"  file      {entry.path}  {m.size} bytes  sha256 {m.sha256}")
    print(f"  verified  {'yes (key ' + m.key_id + ')' if problem is None else 'NO: ' + problem}")
    for kind, tensors in (("input", m.inputs), ("output", m.outputs)):
        for t in tensors:
            quant = f" scale={t.scale:.6g} zero_point={t.zero_point}" if t.scale else ""
            print(f"  {kind:<9} {t.name} {t.dtype}{tuple(t.shape)}{quant}")
    print(f"  preprocess  {json.dumps(data['preprocess'], sort_keys=True)}")
    print(f"  postprocess {json.dumps(data['postprocess'], sort_keys=True)}")
    print(f"  metrics   {json.dumps(m.metrics, sort_keys=True)}   memory ~{m.memory_mb} MB")
    if data["bench"]:
        print(f"  bench     p50 {data['bench'].get('p50_ms')} ms ({data['bench'].get('threads')} thread(s))")
    print(f"  notes     {m.notes}")


def _inspect_tflite(path: Path, as_json: bool) -> int:
    from lepton.models.metadata import read_metadata
    from lepton.models.runtime import runtime_info

    meta = read_metadata(path)
    data = {"path": str(path), **meta.to_json(), "runtime": list(runtime_info())}
    if as_json:
        _print_json(data)
        return 0
    print(f"{path}  {meta.size} bytes  sha256 {meta.sha256}  {meta.op_count} ops")
    for kind, tensors in (("input", meta.inputs), ("output", meta.outputs)):
        for t in tensors:
            print(f"  {kind:<7} {t.name} {t.dtype}{t.shape} scale={t.scale:.6g} zero_point={t.zero_point}")
    return 0


def cmd_add(args) -> int:
    from lepton.models.registry import Registry

    registry = Registry(_registry_root(args), trusted_keys=[Path(k) for k in args.trust] if args.trust else None)
    entry = registry.add(args.path, args.name, args.version, args.spec, args.key)
    if args.json:
        _print_json(_entry_json(entry, None))
    else:
        print(f"added {entry.label()} -> {entry.directory} (signed by key {entry.manifest.key_id})")
    # A version signed with another key than its model's other versions is refused by every device that
    # trusts only those: say so now, not when a rollout stalls.
    others = sorted({e.manifest.key_id for e in registry.scan()[0] if e.name == entry.name
                     and e.version != entry.version})
    if others and entry.manifest.key_id not in others:
        print(f"lepton models: warning: {entry.label()} is signed by key {entry.manifest.key_id}, its other "
              f"versions by {', '.join(others)}: devices that trust only those will refuse it", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    registry = _registry(args)
    entries, problems = registry.scan()
    if args.name:
        entries = [e for e in entries if e.name == args.name]
        problems = [(p, why) for p, why in problems if p.parent.name == args.name or p.parent.parent.name == args.name]
        if not entries and not problems:
            raise ModelError(f"no model named {args.name!r} in registry {registry.root}")
    elif not entries and not problems:  # a wrong --registry must not pass as "all 0 verified"
        raise ModelError(f"no model versions in registry {registry.root}: nothing to verify")
    checked = registry.check(entries)
    ok = all(p is None for _, p in checked) and not problems
    if args.json:
        _print_json({"ok": ok, "registry": str(registry.root), "models": [_entry_json(e, p) for e, p in checked],
                     "problems": [{"manifest": str(path), "problem": why} for path, why in problems]})
        return 0 if ok else 1
    for entry, problem in checked:
        if problem is None:
            print(f"ok      {entry.label()}  sha256 {entry.manifest.sha256[:16]}  key {entry.manifest.key_id}")
        else:
            print(f"FAILED  {problem}")
    for path, why in problems:
        print(f"FAILED  {why}")
    print(f"{'all' if ok else 'NOT all'} {len(checked) + len(problems)} model version(s) verified in {registry.root}")
    return 0 if ok else 1


def cmd_keygen(args) -> int:
    from lepton.models.signing import generate_keypair

    private, public = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    try:
        private.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot create directory {private.parent}: {exc.strerror or exc}") from None
    kid = generate_keypair(private, public, overwrite=args.force)
    if args.json:
        _print_json({"private_key": str(private), "public_key": str(public), "key_id": kid})
    else:
        print(f"wrote {private} (private, mode 0600) and {public} (public); key id {kid}")
    return 0


def cmd_sign(args) -> int:
    from lepton.models.manifest import load_manifest, write_manifest
    from lepton.models.registry import check_file
    from lepton.models.signing import load_private_key, sign_manifest

    path = Path(args.manifest)
    manifest = load_manifest(path)
    check_file(manifest, path.parent / manifest.file)
    signed = sign_manifest(manifest, load_private_key(args.key))
    write_manifest(signed, path)
    if args.json:
        _print_json({"manifest": str(path), "name": signed.name, "version": signed.version, "key_id": signed.key_id})
    else:
        print(f"signed {path} ({signed.name} {signed.version}) with key {signed.key_id}")
    return 0


def cmd_bench(args) -> int:
    from lepton.models.bench import bench_entry, profile_path, write_profile

    if args.threads < 1 or args.iterations < 1 or args.warmup < 0:
        raise ConfigError("--threads and --iterations must be >= 1, --warmup >= 0")
    registry = _registry(args)
    entry = _entry(registry, args.name)
    registry.verify(entry)
    progress, advance = _progress(args.iterations, f"bench {entry.label()}")
    with progress:
        result = bench_entry(entry, args.threads, args.iterations, args.warmup, advance)
    if not args.no_save:
        result["profile"] = str(write_profile(result, args.out or profile_path(entry)))
    if args.json:
        _print_json(result)
        return 0
    print(f"{entry.label()}: p50 {result['p50_ms']:.4g} ms  p95 {result['p95_ms']:.4g} ms  p99 {result['p99_ms']:.4g} ms  "
          f"{result['throughput_per_s']:.1f}/s  ({args.threads} thread(s), {args.iterations} iterations, "
          f"{result['runtime']} {result['runtime_version']})")
    if "profile" in result:
        print(f"compute profile written to {result['profile']}")
    return 0


def cmd_eval(args) -> int:
    from lepton.models.evaluate import evaluate, heldout_count

    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    registry = _registry(args)
    results = []
    for entry in _resolve(registry, args.name):
        registry.verify(entry)
        heldout = registry.heldout_path(entry)
        total = heldout_count(heldout) if heldout else 0
        progress, advance = _progress(total, f"eval {entry.label()}")
        with progress:
            measured = evaluate(entry, registry, args.threads, advance)
        results.append({"name": entry.name, "version": entry.version, "task": entry.manifest.task,
                        "measured": measured, "manifest": entry.manifest.metrics})
    if args.json:
        _print_json(results)
        return 0
    for r in results:
        keys = [k for k in ("accuracy", "precision", "recall", "f1") if k in r["measured"]]
        now = "  ".join(f"{k} {r['measured'][k]:.4f}" for k in keys)
        stated = "  ".join(f"{k} {r['manifest'][k]:.4f}" for k in keys if k in r["manifest"]) or "none"
        print(f"{r['name']} {r['version']}: {now}  on {r['measured']['samples']} held-out samples "
              f"(manifest: {stated})")
    return 0
