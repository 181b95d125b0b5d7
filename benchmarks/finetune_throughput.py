"""Benchmark: training tokens per second and peak memory of `sd2 finetune` on CPU.

For each draft, a child process runs ``sd2_utils.finetune.finetune`` for a few optimizer steps.
It reports the summary's ``tokens_per_second``: non-padding input tokens over the wall time of
``Trainer.train``, first step included. It also reports the steady-state rate over the steps
after the first, from the time at the end of each step, and its own peak resident set size. Results go to ``benchmarks/results/finetune_throughput.json``, with the load average
before and after so that a run on a shared machine can be told apart.

Data: ``--data`` (a distilled folder), or by default the first GSM8K training conversations
with their original answers written in the distilled record format. Throughput does not depend
on who wrote the text, only on its length.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/finetune_throughput.py \
        [--models ID ...] [--steps 6] [--batch-size 2] [--max-seq-length 256] [--threads 2] \
        [--optim adamw_torch] [--data DIR]
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

MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct")
RESULTS = ROOT / "benchmarks" / "results" / "finetune_throughput.json"


def write_gsm8k_folder(directory: Path, num_conversations: int) -> Path:
    """Write GSM8K training conversations (original answers) as a distilled folder."""
    from sd2_utils.data import load_gsm8k

    directory.mkdir(parents=True, exist_ok=True)
    rows = load_gsm8k("train").select(range(num_conversations)).to_list()
    records = [{**row, "kept": True} for row in rows]
    (directory / "shard-00000.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    manifest = {"format_version": 1, "shards": {"shard-00000.jsonl": {"ids": [r["id"] for r in records]}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def make_step_timer():
    """Return a Trainer callback that records the wall time and tokens seen after every step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append((time.perf_counter(), state.num_input_tokens_seen))

    return StepTimer()


def run_worker(args: argparse.Namespace) -> int:
    """Fine-tune one model and print one JSON line with the measurements."""
    import torch

    from sd2_utils import finetune

    torch.set_num_threads(args.threads)
    recorder = make_step_timer()
    with tempfile.TemporaryDirectory() as scratch:
        config = finetune.FinetuneConfig(
            model=args.worker, data=[args.data], out=str(Path(scratch) / "out"), max_steps=args.steps,
            batch_size=args.batch_size, max_seq_length=args.max_seq_length, optim=args.optim,
            bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
            freeze_embeddings=args.freeze_embeddings, save_steps=10**6,
        )
        summary = finetune.finetune(config, callbacks=[recorder])
    times = recorder.times
    steady = None
    if len(times) >= 2:
        (first_time, first_tokens), (last_time, last_tokens) = times[0], times[-1]
        steady = (last_tokens - first_tokens) / (last_time - first_time)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux
    print(json.dumps({
        "model": args.worker,
        "steps": summary["steps"],
        "num_input_tokens_seen": summary["num_input_tokens_seen"],
        "tokens_per_second": round(summary["tokens_per_second"], 2),
        "steady_tokens_per_second": round(steady, 2) if steady else None,
        "seconds_per_step": round(summary["train_runtime"] / summary["steps"], 2),
        "peak_rss_gib": round(peak / 2**30, 3),
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
    }))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--freeze-embeddings", action="store_true")
    parser.add_argument("--data", default=None, help="distilled folder (default: GSM8K train rows)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or str(write_gsm8k_folder(Path(scratch) / "gsm8k", 64))
        load_before = os.getloadavg()
        runs = []
        for model in args.models:
            command = [sys.executable, __file__, "--worker", model, "--data", data,
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--max-seq-length", str(args.max_seq_length), "--threads", str(args.threads),
                       "--optim", args.optim]
            command += [flag for flag, on in (("--bf16", args.bf16),
                                              ("--gradient-checkpointing", args.gradient_checkpointing),
                                              ("--freeze-embeddings", args.freeze_embeddings)) if on]
            completed = subprocess.run(command, capture_output=True, text=True,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if completed.returncode != 0:
                print(completed.stderr[-4000:], file=sys.stderr)
                return completed.returncode
            run = json.loads(completed.stdout.strip().splitlines()[-1])
            print(json.dumps(run))
            runs.append(run)
        load_after = os.getloadavg()

    import torch
    import transformers

    result = {
        "settings": {"steps": args.steps, "batch_size": args.batch_size,
                     "max_seq_length": args.max_seq_length, "threads": args.threads,
                     "optim": args.optim, "bf16": args.bf16,
                     "gradient_checkpointing": args.gradient_checkpointing,
                     "freeze_embeddings": args.freeze_embeddings,
                     "data": args.data or "GSM8K train, first 64 conversations"},
        "runs": runs,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in load_after]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(args.results, result)
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
