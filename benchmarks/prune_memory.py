"""Benchmark: time and peak resident memory of `sd2 prune` on Qwen2.5-Coder-0.5B-Instruct.

Runs ``sd2 prune`` (SparseGPT, 50% unstructured, ShareGPT calibration) in a child process and
reads the child's peak resident set size from ``resource.getrusage(RUSAGE_CHILDREN)``, so the
number covers the whole command: model load, calibration, pruning and saving. Results go to
``benchmarks/results/prune_memory.json``.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/prune_memory.py \
        [--num-calibration-samples 64] [--max-seq-length 512] [--pattern 2:4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sd2_utils.io import atomic_write_json  # noqa: E402
from sd2_utils.models import resolve  # noqa: E402

MODEL_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
RESULTS = ROOT / "benchmarks" / "results" / "prune_memory.json"


def _model_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-calibration-samples", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default=None)
    parser.add_argument("--calibration", default="sharegpt")
    parser.add_argument("--out", default=None, help="keep the pruned draft here (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file for the measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out) if args.out else Path(scratch) / "draft"
        command = [
            str(Path(sys.executable).parent / "sd2"), "prune", "--model", MODEL_ID,
            "--method", args.method, "--calibration", args.calibration,
            "--num-calibration-samples", str(args.num_calibration_samples),
            "--max-seq-length", str(args.max_seq_length), "--out", str(out), "--overwrite",
        ]
        command += ["--pattern", args.pattern] if args.pattern else ["--sparsity", "0.5"]
        started = time.perf_counter()
        completed = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            print(f"sd2 prune failed with exit status {completed.returncode}", file=sys.stderr)
            return completed.returncode
        manifest = json.loads((out / "sparsity_manifest.json").read_text())

    # ru_maxrss is in KiB on Linux.
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    model_bytes = _model_bytes(Path(resolve(MODEL_ID)))
    errors = [entry["reconstruction_error"] for entry in manifest["layers"].values()]
    result = {
        "model": MODEL_ID,
        "method": args.method,
        "pattern": args.pattern,
        "sparsity": manifest["overall_sparsity"],
        "num_calibration_samples": manifest["calibration"]["num_calibration_samples"],
        "max_seq_length": args.max_seq_length,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_rss / 2**30, 3),
        "model_size_gib": round(model_bytes / 2**30, 3),
        "peak_rss_over_model_size": round(peak_rss / model_bytes, 3),
        "mean_reconstruction_error": sum(errors) / len(errors),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": manifest["versions"],
        "command": " ".join(command[1:]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    atomic_write_json(args.results, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
