"""Tokens per second of sd2's speculative decoding engine against transformers assisted generation.

Same target, draft, prompts, K and dtype for both; greedy decoding. For every prompt the two
engines run back to back (alternating which goes first, so load changes hit both alike) and
the outputs are compared token by token. transformers runs ``generate(assistant_model=...)``
with the ``constant`` schedule and confidence threshold 0; for a draft with another tokenizer
it gets ``tokenizer`` and ``assistant_tokenizer`` (its universal assisted generation path).
A prompt on which transformers raises is recorded with the error and left out of its speed.

Reproduce (writes benchmarks/results/speculative_vs_transformers.json):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speculative_vs_transformers.py

Options shrink the run (``--num-prompts``, ``--max-new-tokens``); the file records what ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sd2_utils import data
from sd2_utils.evaluate import transformers_assisted_generate
from sd2_utils.io import atomic_write_json
from sd2_utils.models import load_model
from sd2_utils.speculative import same_vocabulary, speculative_generate

logger = logging.getLogger("benchmarks.speculative_vs_transformers")

RESULTS = Path(__file__).resolve().parent / "results" / "speculative_vs_transformers.json"
TARGET = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
DRAFTS = ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")


def spec_bench_prompts(tokenizer, count: int) -> list[dict]:
    """Pick `count` Spec-Bench first turns, spread over the six category groups."""
    questions = data.load_spec_bench()
    per_group: dict[str, list[dict]] = {}
    for row in questions:
        per_group.setdefault(data.category_group(row["category"]), []).append(row)
    picked: list[dict] = []
    index = 0
    while len(picked) < count:
        for rows in per_group.values():
            if index < len(rows) and len(picked) < count:
                picked.append(rows[index])
        index += 1
    prompts = []
    for row in picked:
        messages = [{"role": "user", "content": row["turns"][0]["content"]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append({"id": row["id"], "category": row["category"],
                        "ids": tokenizer.encode(text, add_special_tokens=False)})
    return prompts


def run_pair(target, target_tokenizer, draft_name: str, prompts: list[dict], k: int,
             max_new_tokens: int, dtype: str) -> dict:
    draft, draft_tokenizer = load_model(draft_name, dtype=dtype)
    shared = same_vocabulary(target_tokenizer, draft_tokenizer)
    tokenizers = {} if shared else {"target_tokenizer": target_tokenizer, "draft_tokenizer": draft_tokenizer}

    def ours(ids, tokens):
        started = time.perf_counter()
        output = speculative_generate(target, draft, ids, num_assistant_tokens=k, max_new_tokens=tokens, **tokenizers)
        return output.new_token_ids, len(output.rounds), time.perf_counter() - started

    def theirs(ids, tokens):
        result = transformers_assisted_generate(
            target, draft, ids, k, tokens,
            None if shared else target_tokenizer, None if shared else draft_tokenizer,
        )
        return result["new_token_ids"], result["target_forward_passes"], result["wall_time"]

    # Warm-up: first calls pay one-off allocation and kernel selection costs.
    ours(prompts[0]["ids"], 8)
    try:
        theirs(prompts[0]["ids"], 8)
    except Exception:  # noqa: BLE001 - recorded per prompt below
        pass

    rows = []
    for index, prompt in enumerate(prompts):
        row = {"id": prompt["id"], "category": prompt["category"], "prompt_tokens": len(prompt["ids"])}
        engines = [("sd2", ours), ("transformers", theirs)]
        if index % 2:
            engines.reverse()
        for name, engine in engines:
            try:
                new_ids, passes, seconds = engine(prompt["ids"], max_new_tokens)
                row[name] = {"new_tokens": len(new_ids), "target_forward_passes": passes,
                             "wall_time": seconds, "ids": new_ids}
            except Exception as error:  # noqa: BLE001 - transformers' UAG path can raise; record it
                logger.warning("%s failed on %s: %s", name, prompt["id"], error)
                row[name] = {"error": f"{type(error).__name__}: {error}"}
        if "ids" in row["sd2"] and "ids" in row["transformers"]:
            row["identical"] = row["sd2"]["ids"] == row["transformers"]["ids"]
        logger.info("%s %s: %s", draft_name, prompt["id"],
                    {name: round(row[name].get("wall_time", float("nan")), 2) for name in ("sd2", "transformers")})
        rows.append(row)

    def totals(name):
        finished = [r for r in rows if "ids" in r["sd2"] and "ids" in r["transformers"]]
        tokens = sum(r[name]["new_tokens"] for r in finished)
        seconds = sum(r[name]["wall_time"] for r in finished)
        passes = sum(r[name]["target_forward_passes"] for r in finished)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds if seconds else None,
                "mal": tokens / passes if passes else None}

    ours_total, theirs_total = totals("sd2"), totals("transformers")
    for row in rows:
        for name in ("sd2", "transformers"):
            row[name].pop("ids", None)
    del draft
    return {
        "draft": draft_name,
        "shared_tokenizer": shared,
        "prompts_compared": sum("identical" in r for r in rows),
        "identical_outputs": sum(r.get("identical", False) for r in rows),
        "transformers_errors": sum("error" in r["transformers"] for r in rows),
        "sd2": ours_total,
        "transformers": theirs_total,
        "speed_ratio": (ours_total["tokens_per_second"] / theirs_total["tokens_per_second"])
        if ours_total["tokens_per_second"] and theirs_total["tokens_per_second"] else None,
        "per_prompt": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--drafts", nargs="+", default=list(DRAFTS))
    parser.add_argument("--num-prompts", type=int, default=12, help="Spec-Bench prompts (default 12)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    parser.add_argument("--num-assistant-tokens", "-k", type=int, default=4, help="K for both engines (default 4)")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads; 0 keeps torch's default (one per core)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    target, target_tokenizer = load_model(args.target, dtype=args.dtype)
    prompts = spec_bench_prompts(target_tokenizer, args.num_prompts)
    pairs: list[dict] = []
    for name in args.drafts:
        pairs.append(run_pair(target, target_tokenizer, name, prompts, args.num_assistant_tokens,
                              args.max_new_tokens, args.dtype))
        # Written after each pair, so a run stopped early keeps the finished pairs.
        atomic_write_json(args.out, _result(args, argv, prompts, pairs))
    print(json.dumps({p["draft"]: {k: p[k] for k in ("speed_ratio", "identical_outputs", "prompts_compared",
                                                      "transformers_errors")} for p in pairs}, indent=2))
    return 0


def _result(args: argparse.Namespace, argv: list[str] | None, prompts: list[dict], pairs: list[dict]) -> dict:
    return {
        "command": " ".join(["python", "benchmarks/speculative_vs_transformers.py", *(argv or sys.argv[1:])]),
        "target": args.target,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "num_assistant_tokens": args.num_assistant_tokens,
        "dtype": args.dtype,
        "pairs": pairs,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


if __name__ == "__main__":
    sys.exit(main())
