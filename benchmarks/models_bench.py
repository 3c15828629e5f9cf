"""Bare-invoke time and throughput of every zoo model on this machine.

    python benchmarks/models_bench.py [--iterations N] [--threads N] [--json]

For each model: p50 and p95 of ``Interpreter.invoke()`` alone (input set
once; nothing else in the loop) and the throughput of that loop; then the
same through ``ModelRunner.invoke`` (set_tensor, lock, output copies), and
the ratio runner / bare measured in the same run. The bare figures are the
baseline the agent's per-inference overhead is judged against (within 5%).
Models are measured interleaved, round by round, so a burst of load from
elsewhere on the machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lepton.models.bench import sample_input
from lepton.models.registry import Registry, zoo_dir
from lepton.models.runner import ModelRunner
from lepton.models.runtime import load_interpreter, runtime_info


class Bare:
    """One interpreter with its input set once: invoke() and nothing else."""

    def __init__(self, entry, tensor: np.ndarray, threads: int):
        self.interpreter = load_interpreter(entry.path, num_threads=threads)
        self.interpreter.set_tensor(self.interpreter.get_input_details()[0]["index"], tensor)

    def __call__(self) -> None:
        self.interpreter.invoke()


def _time_round(fn, n: int, out: list[float]) -> float:
    """Run ``fn`` n times, appending per-call ms; returns the loop's wall seconds."""
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return time.perf_counter() - start


def measure(entries, iterations: int, threads: int, rounds: int = 10) -> list[dict]:
    """Per model: bare and runner p50/p95 and throughput, measured interleaved."""
    cases = []
    for entry in entries:
        runner = ModelRunner.from_entry(entry, num_threads=threads)
        tensor = sample_input(runner)
        bare = Bare(entry, tensor, threads)
        runner.warmup(10)
        for _ in range(10):
            bare()
        cases.append({"entry": entry, "bare": bare, "runner": lambda r=runner, t=tensor: r.invoke(t),
                      "bare_ms": [], "runner_ms": [], "bare_s": 0.0, "runner_s": 0.0})
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for case in cases:
            case["bare_s"] += _time_round(case["bare"], per_round, case["bare_ms"])
            case["runner_s"] += _time_round(case["runner"], per_round, case["runner_ms"])
    results = []
    for case in cases:
        bare, runner = np.asarray(case["bare_ms"]), np.asarray(case["runner_ms"])
        results.append({
            "model": case["entry"].name,
            "bare_p50_ms": round(float(np.percentile(bare, 50)), 4),
            "bare_p95_ms": round(float(np.percentile(bare, 95)), 4),
            "bare_throughput_per_s": round(bare.size / case["bare_s"], 1),
            "runner_p50_ms": round(float(np.percentile(runner, 50)), 4),
            "runner_throughput_per_s": round(runner.size / case["runner_s"], 1),
            "runner_over_bare_p50": round(float(np.percentile(runner, 50) / np.percentile(bare, 50)), 3),
            "iterations": int(bare.size),
        })
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=500, help="timed invocations per model (default 500)")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    entries = Registry(zoo_dir()).list(verified=True)
    results = measure(entries, args.iterations, args.threads)
    name, version = runtime_info()
    if args.json:
        print(json.dumps({"runtime": [name, version], "threads": args.threads, "models": results}, indent=2))
        return 0
    print(f"runtime {name} {version}, {args.threads} thread(s), {results[0]['iterations']} invocations per model")
    print(f"{'model':<16} {'bare p50 ms':>12} {'bare p95 ms':>12} {'bare /s':>10} {'runner p50 ms':>14} {'runner/bare':>12}")
    for r in results:
        print(f"{r['model']:<16} {r['bare_p50_ms']:>12.4f} {r['bare_p95_ms']:>12.4f} {r['bare_throughput_per_s']:>10.1f} "
              f"{r['runner_p50_ms']:>14.4f} {r['runner_over_bare_p50']:>12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
