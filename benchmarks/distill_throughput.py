"""Throughput of self-data distillation: batched against batch-1 generation with the target.

Generates greedy responses for the same ShareGPT prompts once per (dtype, batch size) with
``sd2_utils.distill.generate_responses`` (left padding, batches sorted by prompt length, each
row stopping at its own end-of-sequence token), and records the generated tokens per second.
Tokens per second counts the response tokens kept (up to each row's end of sequence), so the
padding steps that finished rows spend inside a batch count against the batched runs.

Usage (writes benchmarks/results/distill_throughput.json):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distill_throughput.py \
        --dtypes bfloat16 --batch-sizes 1 8 16 --num-prompts 16 --max-new-tokens 32

Each invocation replaces the recorded runs of its dtypes and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from sd2_utils import data, distill
from sd2_utils.io import atomic_write_json, read_json
from sd2_utils.models import load_model

logger = logging.getLogger("distill_throughput")
RESULTS = Path(__file__).resolve().parent / "results" / "distill_throughput.json"


def choose_prompts(tokenizer, num_prompts: int, max_prompt_tokens: int, seed: int) -> list[list[dict]]:
    """Draw the first user turns of ShareGPT conversations with the distillation stage's plan."""
    config = distill.DistillConfig(target="benchmark", dataset="sharegpt", num_samples=num_prompts,
                                   max_prompt_tokens=max_prompt_tokens, max_turns=1,
                                   batch_size=num_prompts, seed=seed)
    plan = distill.plan_conversations(data.load_sharegpt().to_list(), config, tokenizer,
                                      distill.HeldOutIndex(distill.held_out_prompts()))
    return [[conversation["turns"][0]] for batch in plan.batches for conversation in batch]


def measure(model, tokenizer, prompts, batch_size: int, max_new_tokens: int) -> dict:
    """Generate every prompt in batches of `batch_size`; return tokens, seconds and texts."""
    texts, tokens, started = [], 0, time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        generations = distill.generate_responses(model, tokenizer, prompts[start:start + batch_size],
                                                 max_new_tokens)
        texts += [generation.text for generation in generations]
        tokens += sum(generation.completion_tokens for generation in generations)
    seconds = time.perf_counter() - started
    return {"batch_size": batch_size, "generated_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 3), "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="Qwen/Qwen2.5-Coder-1.5B-Instruct")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    runs = []
    for dtype in args.dtypes:
        model, tokenizer = load_model(args.target, dtype=dtype)
        prompts = choose_prompts(tokenizer, args.num_prompts, args.max_prompt_tokens, args.seed)
        load_before = os.getloadavg()[0]
        results = {size: measure(model, tokenizer, prompts, size, args.max_new_tokens)
                   for size in args.batch_sizes}
        texts = {size: result.pop("texts") for size, result in results.items()}
        baseline_size = min(args.batch_sizes)
        baseline = results[baseline_size]
        for size, result in results.items():
            identical = sum(a == b for a, b in zip(texts[size], texts[baseline_size]))
            row = {"dtype": dtype, "num_prompts": len(prompts),
                   "max_new_tokens": args.max_new_tokens, "threads": args.threads, **result,
                   "speedup_vs_batch1": round(result["tokens_per_second"]
                                              / baseline["tokens_per_second"], 2),
                   "responses_identical_to_batch1": f"{identical}/{len(prompts)}",
                   "load_average_1min_before": round(load_before, 2)}
            logger.info("%s", row)
            runs.append(row)
        del model

    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distill_throughput.py " + " ".join(
        f"--{key.replace('_', '-')} "
        + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
        for key, value in vars(args).items() if key != "out")
    for row in runs:
        row["command"] = command
    # Runs of other dtypes recorded by an earlier invocation are kept, so each dtype can be
    # measured with its own prompt count and token limit.
    previous = read_json(args.out, default={}) or {}
    kept = [row for row in previous.get("runs", []) if row["dtype"] not in args.dtypes]
    record = {
        "benchmark": "distill_throughput",
        "target": args.target,
        "max_prompt_tokens": args.max_prompt_tokens,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "note": "shared machine: other jobs ran at the same time (see load averages)"},
        "versions": distill._versions(),
        "runs": kept + runs,
    }
    atomic_write_json(args.out, record)
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
