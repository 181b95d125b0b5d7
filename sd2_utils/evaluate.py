"""Benchmark runner: speculative decoding on evaluation prompts, with MAL, MACs and speedup.

``sd2 eval`` runs one target and one draft over a benchmark (Spec-Bench, MT-Bench, HumanEval or
GSM8K). For each question it

1. applies the target's own chat template turn by turn (a second turn sees the first answer);
2. runs the target alone with greedy decoding (the reference output and the baseline wall
   time), stored in a baseline JSONL shared by every draft evaluated on the same settings;
3. runs speculative decoding and writes one JSONL line in Spec-Bench's answer format
   (``choices[0]`` holds ``turns``, ``new_tokens``, ``wall_time``, ``accept_lengths`` per turn)
   plus the engine's per-round records.

Finished questions are skipped when a run is resumed. At the end a summary JSON (MAL overall and
per category group, acceptance per position, MACs, improvement factor, speedup, and the number
of greedy outputs that differ from the target's) is printed and written next to the JSONL.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import data as data_module
from .io import atomic_write_json, atomic_write_text, weights_fingerprint
from .metrics import (
    acceptance_alpha,
    acceptance_per_position,
    count_macs,
    expected_mal,
    improvement_factor,
    mean_accepted_length,
    mean_accepted_length_without_last,
)
from .models import load_model
from .speculative import (
    SCHEDULES,
    SpeculativeOutput,
    speculative_generate,
    target_generate,
)

logger = logging.getLogger(__name__)

SUMMARY_SUFFIX = ".summary.json"
# Settings that must match for a resumed run to append to an existing answer file.
RUN_KEYS = ("target", "draft", "benchmark", "num_assistant_tokens", "max_new_tokens",
            "temperature", "top_p", "top_k", "schedule", "dtype", "seed")


@dataclasses.dataclass
class EvalSettings:
    """One evaluation: the pair, the benchmark and the decoding settings."""

    target: str
    draft: str
    benchmark: str
    out: Path
    num_assistant_tokens: int = 4
    per_category: int | None = None
    per_group: int | None = None
    max_questions: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    schedule: str = "constant"
    dtype: str = "float32"
    seed: int = 0
    baseline: bool = True
    baseline_path: Path | None = None
    cross_check_transformers: bool = False
    draft_name: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.benchmark not in data_module.BENCHMARKS:
            raise ValueError(
                f"unknown benchmark {self.benchmark!r}; choose one of {', '.join(data_module.BENCHMARKS)}"
            )
        if not isinstance(self.num_assistant_tokens, int) or self.num_assistant_tokens < 1:
            raise ValueError(
                f"`num_assistant_tokens` (K) must be an integer >= 1, got {self.num_assistant_tokens!r}; "
                "pass --num-assistant-tokens 1 or more"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"invalid schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        for name in ("per_category", "per_group", "max_questions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 (or None for all questions), got {value}")
        if self.draft_name is None:
            self.draft_name = Path(self.draft).name if Path(self.draft).is_dir() else self.draft

    @functools.cached_property
    def draft_weights(self) -> str | None:
        """Short sha256 of a draft directory's safetensors files, or None for a model id."""
        return weights_fingerprint(self.draft)

    def run_record(self) -> dict[str, Any]:
        record = {key: getattr(self, key) for key in RUN_KEYS}
        record["draft"] = str(record["draft"])
        record["draft_weights"] = self.draft_weights
        return record

    def baseline_file(self) -> Path:
        """Baseline answers depend on the target, benchmark and budget, not on the draft."""
        if self.baseline_path is not None:
            return Path(self.baseline_path)
        slug = self.target.replace("/", "--")
        name = f"baseline-{slug}-{self.benchmark}-{self.max_new_tokens}tok-{self.dtype}.jsonl"
        return self.out.parent / name

    def summary_file(self) -> Path:
        return self.out.with_name(self.out.stem + SUMMARY_SUFFIX)


# ----------------------------------------------------------------------------------------------
# Answer files


def read_answers(path: Path) -> dict[str, dict]:
    """Read finished answers keyed by question id; an unreadable last line is dropped."""
    answers: dict[str, dict] = {}
    if not path.exists():
        return answers
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: dropping an incomplete last line (an interrupted write)", path)
                continue
            raise ValueError(f"{path}:{number}: invalid JSON line. Fix or delete the file") from None
        answers[record["question_id"]] = record
    return answers


def _write_answers(path: Path, answers: dict[str, dict]) -> None:
    # The whole file is rewritten atomically, so a crash leaves the previous complete version.
    atomic_write_text(path, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers.values()))


def _check_resumable(path: Path, answers: dict[str, dict], settings: EvalSettings) -> bool:
    """Raise for stored answers from other settings, and move aside those of an earlier draft build.

    Returns:
        Whether the stored answers can be resumed (False once they were moved aside).
    """
    expected = settings.run_record()
    for answer in answers.values():
        found = answer.get("run", {})
        different = {key: (found.get(key), value) for key, value in expected.items() if found.get(key) != value}
        if set(different) == {"draft_weights"}:
            stale = path.with_name(f"{path.stem}.draft-{found.get('draft_weights')}{path.suffix}")
            os.replace(path, stale)
            logger.warning("%s was written for an earlier build of draft %s (weights %s, now %s), so it "
                           "was moved to %s and the draft is evaluated again", path, settings.draft,
                           found.get("draft_weights"), settings.draft_weights, stale)
            return False
        if different:
            detail = ", ".join(f"{key}: file has {old!r}, requested {new!r}" for key, (old, new) in different.items())
            raise ValueError(
                f"{path} contains answers from other settings ({detail}); pass another --out or delete the file"
            )
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Prompts


def _chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"target tokenizer {tokenizer.name_or_path!r} has no chat template; evaluate an "
            "instruction-tuned target, whose template turns the questions into prompts"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def load_questions(settings: EvalSettings):
    questions = data_module.load_benchmark(settings.benchmark)
    if settings.per_category is not None:
        questions = data_module.sample_per_category(questions, settings.per_category, seed=settings.seed)
    if settings.per_group is not None:
        questions = questions.map(lambda row: {"category_group": _group(settings, row["category"])})
        questions = data_module.sample_per_category(
            questions, settings.per_group, seed=settings.seed, column="category_group"
        )
    if settings.max_questions is not None:
        questions = questions.select(range(min(settings.max_questions, len(questions))))
    return questions


def _user_turns(question: dict) -> list[str]:
    return [turn["content"] for turn in question["turns"] if turn["role"] == "user"]


def _group(settings: EvalSettings, category: str) -> str:
    return data_module.category_group(category) if settings.benchmark == "spec-bench" else category


# ----------------------------------------------------------------------------------------------
# Generation per question


def _run_turns(question: dict, tokenizer, generate) -> list[tuple[SpeculativeOutput, str]]:
    """Run every user turn; each later turn's prompt contains the earlier answers."""
    messages: list[dict] = []
    results = []
    for content in _user_turns(question):
        messages.append({"role": "user", "content": content})
        output = generate(_chat_prompt_ids(tokenizer, messages))
        text = tokenizer.decode(output.new_token_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
        results.append((output, text))
    return results


def _round_fields(output: SpeculativeOutput) -> dict[str, list]:
    rounds = output.rounds
    return {
        "drafted": [r.num_drafted for r in rounds],
        "draft_tokens": [r.num_draft_tokens for r in rounds],
        "accepted": [r.num_accepted for r in rounds],
        "emitted": [r.num_emitted for r in rounds],
        "draft_forward_passes": [r.draft_forward_passes for r in rounds],
        "draft_time": [round(r.draft_time, 6) for r in rounds],
        "verify_time": [round(r.verify_time, 6) for r in rounds],
        "reencode_time": [round(r.reencode_time, 6) for r in rounds],
    }


def _baseline_answer(question: dict, target, tokenizer, settings: EvalSettings) -> dict:
    results = _run_turns(
        question, tokenizer,
        lambda ids: target_generate(target, ids, settings.max_new_tokens, target_tokenizer=tokenizer),
    )
    return {
        "question_id": question["id"],
        "category": question["category"],
        "model_id": settings.target,
        "turns": [text for _, text in results],
        "new_tokens": [output.num_new_tokens for output, _ in results],
        "wall_time": [output.wall_time for output, _ in results],
        "new_token_ids": [output.new_token_ids for output, _ in results],
        "run": {key: getattr(settings, key) for key in ("target", "benchmark", "max_new_tokens", "dtype")},
    }


def _speculative_answer(question: dict, target, draft, target_tokenizer, draft_tokenizer, settings, generator) -> dict:
    results = _run_turns(
        question, target_tokenizer,
        lambda ids: speculative_generate(
            target, draft, ids,
            num_assistant_tokens=settings.num_assistant_tokens,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            target_tokenizer=target_tokenizer,
            draft_tokenizer=draft_tokenizer,
            generator=generator,
            schedule=settings.schedule,
        ),
    )
    outputs = [output for output, _ in results]
    return {
        "question_id": question["id"],
        "category": question["category"],
        "category_group": _group(settings, question["category"]),
        "answer_id": f"{question['id']}-{settings.draft_name}-k{settings.num_assistant_tokens}",
        "model_id": f"{settings.target}+{settings.draft_name}",
        "choices": [{
            "index": 0,
            "turns": [text for _, text in results],
            "new_tokens": [output.num_new_tokens for output in outputs],
            "wall_time": [output.wall_time for output in outputs],
            "accept_lengths": [output.accept_lengths for output in outputs],
            "decoding_steps": [len(output.rounds) for output in outputs],
        }],
        "tstamp": time.time(),
        "new_token_ids": [output.new_token_ids for output in outputs],
        "stop_reasons": [output.stop_reason for output in outputs],
        "rounds": [_round_fields(output) for output in outputs],
        "run": settings.run_record(),
    }


# ----------------------------------------------------------------------------------------------
# Cross-check against transformers assisted generation


class ForwardCounter:
    """Counts forward calls of a module (target forward passes inside ``generate``)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


@torch.inference_mode()
def transformers_assisted_generate(
    target, draft, input_ids: list[int], num_assistant_tokens: int, max_new_tokens: int,
    target_tokenizer=None, draft_tokenizer=None,
) -> dict[str, Any]:
    """Greedy ``generate(assistant_model=...)`` with a constant K and confidence threshold 0.

    Returns:
        ``new_token_ids``, ``target_forward_passes``, ``mal`` and ``wall_time``.
    """
    config = draft.generation_config
    saved = (config.num_assistant_tokens, config.num_assistant_tokens_schedule,
             getattr(config, "assistant_confidence_threshold", None))
    config.num_assistant_tokens = num_assistant_tokens
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0
    kwargs: dict[str, Any] = {}
    if draft_tokenizer is not None and target_tokenizer is not None:
        kwargs = {"tokenizer": target_tokenizer, "assistant_tokenizer": draft_tokenizer}
    counter = ForwardCounter(target)
    try:
        prompt = torch.tensor([input_ids], device=next(target.parameters()).device)
        started = time.perf_counter()
        sequences = target.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            assistant_model=draft,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            num_assistant_tokens=num_assistant_tokens,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.0,
            **kwargs,
        )
        wall_time = time.perf_counter() - started
    finally:
        counter.remove()
        (config.num_assistant_tokens, config.num_assistant_tokens_schedule,
         config.assistant_confidence_threshold) = saved
    new_ids = sequences[0, len(input_ids):].tolist()
    return {
        "new_token_ids": new_ids,
        "target_forward_passes": counter.calls,
        "mal": len(new_ids) / counter.calls if counter.calls else math.nan,
        "wall_time": wall_time,
    }


# ----------------------------------------------------------------------------------------------
# Summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(
    answers: list[dict],
    baselines: dict[str, dict],
    settings: EvalSettings,
    target_macs=None,
    draft_macs=None,
    cross_checks: list[dict] | None = None,
) -> dict[str, Any]:
    """Pool the per-question records into the summary the runner prints and writes."""
    emitted_by_answer: list[list[int]] = []
    emitted_by_group: dict[str, list[list[int]]] = defaultdict(list)
    drafted: list[int] = []
    accepted: list[int] = []
    timing = defaultdict(float)
    spec_time = base_time = 0.0
    spec_tokens = base_tokens = 0
    mismatches: list[str] = []
    compared = 0
    for answer in answers:
        group = answer.get("category_group", answer["category"])
        choice = answer["choices"][0]
        for turn, rounds in enumerate(answer["rounds"]):
            emitted_by_answer.append(rounds["emitted"])
            emitted_by_group[group].append(rounds["emitted"])
            drafted.extend(rounds["drafted"])
            accepted.extend(rounds["accepted"])
            for key in ("draft_time", "verify_time", "reencode_time"):
                timing[key] += sum(rounds[key])
        baseline = baselines.get(answer["question_id"])
        if baseline is None:
            continue
        spec_time += sum(choice["wall_time"])
        spec_tokens += sum(choice["new_tokens"])
        base_time += sum(baseline["wall_time"])
        base_tokens += sum(baseline["new_tokens"])
        if settings.temperature == 0.0:
            compared += 1
            if baseline["new_token_ids"] != answer["new_token_ids"]:
                mismatches.append(answer["question_id"])

    mal = mean_accepted_length(emitted_by_answer)
    alpha = acceptance_alpha(drafted, accepted)
    width = max(drafted, default=settings.num_assistant_tokens)
    summary: dict[str, Any] = {
        "run": settings.run_record(),
        "draft_name": settings.draft_name,
        "num_questions": len(answers),
        "num_turns": len(emitted_by_answer),
        "mal": mal,
        "mal_without_last_round": mean_accepted_length_without_last(emitted_by_answer),
        "mal_per_group": {group: mean_accepted_length(rows) for group, rows in sorted(emitted_by_group.items())},
        "acceptance_per_position": acceptance_per_position(drafted, accepted, width),
        "alpha": alpha,
        "expected_mal": expected_mal(alpha, settings.num_assistant_tokens)
        if settings.schedule == "constant" else None,
        "time_split_seconds": dict(timing),
        "greedy_outputs_compared": compared,
        "greedy_mismatches": len(mismatches) if settings.temperature == 0.0 and compared else None,
        "greedy_mismatch_ids": mismatches,
        "speculative_tokens_per_second": spec_tokens / spec_time if spec_time else None,
        "target_tokens_per_second": base_tokens / base_time if base_time else None,
        "speedup": (base_time / base_tokens) / (spec_time / spec_tokens) if spec_time and base_time else None,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }
    if target_macs is not None and draft_macs is not None:
        cost_ratio = draft_macs.total / target_macs.total
        summary.update({
            "target_macs_per_token": target_macs.total,
            "draft_macs_per_token": draft_macs.total,
            "macs_convention": "non-zero linear weights plus lm_head, attention products left out",
            "cost_ratio": cost_ratio,
            "improvement_factor": improvement_factor(mal, settings.num_assistant_tokens, cost_ratio),
        })
    if cross_checks:
        hf_tokens = sum(len(c["new_token_ids"]) for c in cross_checks)
        hf_passes = sum(c["target_forward_passes"] for c in cross_checks)
        summary["transformers_cross_check"] = {
            "turns": len(cross_checks),
            "same_outputs": sum(c["same_output"] for c in cross_checks),
            "mal": hf_tokens / hf_passes if hf_passes else None,
            "tokens_per_second": hf_tokens / sum(c["wall_time"] for c in cross_checks),
        }
    return summary


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


# ----------------------------------------------------------------------------------------------
# Entry points


def run_evaluation(settings: EvalSettings, loaded_models: dict | None = None) -> dict[str, Any]:
    """Evaluate one draft with one target on a benchmark; resume from existing files.

    Args:
        settings: the evaluation (pair, benchmark, decoding settings, output path).
        loaded_models: optional cache of loaded ``(model, tokenizer)`` pairs keyed by name, so a
            notebook evaluating several drafts loads the target once.

    Returns:
        The summary dict, also written to ``<out stem>.summary.json``.
    """
    loaded_models = {} if loaded_models is None else loaded_models
    questions = load_questions(settings)
    answers = read_answers(settings.out)
    if not _check_resumable(settings.out, answers, settings):
        answers = {}
    baseline_path = settings.baseline_file()
    baselines = read_answers(baseline_path) if settings.baseline else {}

    def model(name: str):
        key = (str(name), settings.dtype)
        if key not in loaded_models:
            loaded_models[key] = load_model(name, dtype=settings.dtype)
        return loaded_models[key]

    target, target_tokenizer = model(settings.target)
    draft, draft_tokenizer = model(settings.draft)
    generator = torch.Generator().manual_seed(settings.seed)
    cross_checks: list[dict] = []
    logger.info("Evaluating %s drafting for %s on %d %s questions (K=%d, %d new tokens)",
                settings.draft_name, settings.target, len(questions), settings.benchmark,
                settings.num_assistant_tokens, settings.max_new_tokens)
    for question in tqdm(list(questions), desc=f"eval {settings.draft_name}", unit="question"):
        if settings.baseline and question["id"] not in baselines:
            baselines[question["id"]] = _baseline_answer(question, target, target_tokenizer, settings)
            _write_answers(baseline_path, baselines)
        if question["id"] not in answers:
            answers[question["id"]] = _speculative_answer(
                question, target, draft, target_tokenizer, draft_tokenizer, settings, generator
            )
            _write_answers(settings.out, answers)
        if settings.cross_check_transformers:
            cross_checks.extend(_cross_check(question, answers[question["id"]], target, draft,
                                             target_tokenizer, draft_tokenizer, settings))

    selected = [answers[q] for q in questions["id"]]
    summary = summarize(
        selected, baselines, settings,
        target_macs=count_macs(target), draft_macs=count_macs(draft), cross_checks=cross_checks,
    )
    if summary["greedy_mismatches"] and settings.dtype == "float32":
        logger.error(
            "BUG: %d greedy outputs differ from the target's own greedy decoding (%s). Greedy "
            "speculative decoding in float32 must reproduce the target token for token",
            summary["greedy_mismatches"], ", ".join(summary["greedy_mismatch_ids"]),
        )
    elif summary["greedy_mismatches"]:
        logger.info(
            "%d greedy outputs differ from the target's own greedy decoding (%s): in %s, verifying "
            "K + 1 tokens in one forward pass rounds differently and can flip a near-tie; use "
            "float32 to compare token for token", summary["greedy_mismatches"],
            ", ".join(summary["greedy_mismatch_ids"]), settings.dtype,
        )
    atomic_write_json(settings.summary_file(), summary)
    logger.info("Wrote %s and %s", settings.out, settings.summary_file())
    return summary


def _cross_check(question, answer, target, draft, target_tokenizer, draft_tokenizer, settings) -> list[dict]:
    """Rerun each turn with transformers assisted generation on the same prompts."""
    checks = []
    messages: list[dict] = []
    shared = target_tokenizer.get_vocab() == draft_tokenizer.get_vocab()
    for turn, content in enumerate(_user_turns(question)):
        messages.append({"role": "user", "content": content})
        ids = _chat_prompt_ids(target_tokenizer, messages)
        result = transformers_assisted_generate(
            target, draft, ids, settings.num_assistant_tokens, settings.max_new_tokens,
            None if shared else target_tokenizer, None if shared else draft_tokenizer,
        )
        result["same_output"] = result["new_token_ids"] == answer["new_token_ids"][turn]
        checks.append(result)
        messages.append({"role": "assistant", "content": answer["choices"][0]["turns"][turn]})
    return checks


def evaluate_drafts(
    target: str,
    drafts: list[dict],
    benchmark: str,
    out_dir: str | os.PathLike,
    loaded_models: dict | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Evaluate several drafts for one target; a draft directory that does not exist is skipped.

    Args:
        drafts: ``[{"name": ..., "path": hub id or directory}, ...]``.
        out_dir: answers go to ``<out_dir>/<name>.jsonl`` and summaries beside them.
        options: further ``EvalSettings`` fields (num_assistant_tokens, max_new_tokens, ...).

    Returns:
        One summary per evaluated draft.
    """
    from .models import EMBEDDED_MODELS

    loaded_models = {} if loaded_models is None else loaded_models
    summaries = []
    for entry in drafts:
        name, path = entry["name"], str(entry["path"])
        if not Path(path).is_dir() and path not in EMBEDDED_MODELS and not _could_be_hub_id(path):
            logger.warning("Skipping draft %r: %s does not exist yet (run the stage that builds it)", name, path)
            continue
        settings = EvalSettings(target=target, draft=path, benchmark=benchmark,
                                out=Path(out_dir) / f"{name}.jsonl", draft_name=name, **options)
        summaries.append(run_evaluation(settings, loaded_models))
    return summaries


def _could_be_hub_id(name: str) -> bool:
    """Check whether `name` can still load from the Hub: online, and shaped like ``owner/model``."""
    from .models import hub_offline

    return not hub_offline() and not name.startswith((".", "/")) and name.count("/") == 1


# ----------------------------------------------------------------------------------------------
# Figures (drawn here, saved by the notebook through `sd2_utils.figures.save_fig`)


def plot_mal_per_group(summaries: list[dict]):
    """Bar chart: MAL per category group, one bar per draft."""
    import matplotlib.pyplot as plt
    import numpy as np

    groups = sorted({group for s in summaries for group in s["mal_per_group"]})
    fig, ax = plt.subplots()
    width = 0.8 / max(len(summaries), 1)
    positions = np.arange(len(groups))
    for index, summary in enumerate(summaries):
        values = [summary["mal_per_group"].get(group, math.nan) for group in groups]
        ax.bar(positions + index * width, values, width, label=summary["draft_name"])
    ax.set_xticks(positions + width * (len(summaries) - 1) / 2, groups, rotation=20)
    ax.set_ylabel("MAL (tokens per target forward pass)")
    ax.set_title("Mean accepted length per Spec-Bench category group")
    ax.legend()
    return fig


def plot_acceptance_per_position(summaries: list[dict]):
    """Line chart: acceptance rate at each draft position, one line per draft."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for summary in summaries:
        rates = summary["acceptance_per_position"]
        ax.plot(range(1, len(rates) + 1), rates, marker="o", label=summary["draft_name"])
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1)
    ax.set_title("Acceptance per draft position")
    ax.legend()
    return fig


def plot_mal_vs_macs(summaries: list[dict]):
    """Scatter: MAL against draft MACs per token."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for summary in summaries:
        ax.scatter(summary["draft_macs_per_token"] / 1e6, summary["mal"], s=40)
        ax.annotate(summary["draft_name"], (summary["draft_macs_per_token"] / 1e6, summary["mal"]),
                    textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("draft MMACs per token")
    ax.set_ylabel("MAL")
    ax.set_title("MAL against draft cost")
    return fig


# ----------------------------------------------------------------------------------------------
# Command line


def _eval_command(args: argparse.Namespace) -> int:
    settings = EvalSettings(
        target=args.target,
        draft=args.draft,
        benchmark=args.benchmark,
        out=Path(args.out),
        num_assistant_tokens=args.num_assistant_tokens,
        per_category=args.per_category,
        per_group=args.per_group,
        max_questions=args.max_questions,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        schedule=args.schedule,
        dtype=args.dtype,
        seed=args.seed,
        baseline=not args.no_baseline,
        cross_check_transformers=args.cross_check_transformers,
    )
    summary = run_evaluation(settings)
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary["greedy_mismatches"] else 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="run speculative decoding on a benchmark and report MAL, MACs and speedup",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--target", required=True, help="target model: Hub id or local directory")
    parser.add_argument("--draft", required=True, help="draft model: Hub id or local directory")
    parser.add_argument("--benchmark", required=True, help=f"one of {', '.join(data_module.BENCHMARKS)}")
    parser.add_argument("--num-assistant-tokens", "-k", type=int, default=4,
                        help="K, tokens the draft proposes per round (default 4)")
    parser.add_argument("--per-category", type=int, default=None,
                        help="questions drawn per category (default: all)")
    parser.add_argument("--per-group", type=int, default=None,
                        help="questions drawn per category group (Spec-Bench's six groups; default: all)")
    parser.add_argument("--max-questions", type=int, default=None, help="cap on questions (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per turn (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), > 0 to sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0, off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0, off)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="K per round: constant, or transformers' heuristic (+2 after a full accept, -1 otherwise)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32 (default) or bfloat16")
    parser.add_argument("--seed", type=int, default=0, help="seed for question sampling and token sampling")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the target-only run (no speedup and no output comparison)")
    parser.add_argument("--cross-check-transformers", action="store_true",
                        help="also run transformers generate(assistant_model=...) and compare outputs and MAL")
    parser.add_argument("--out", required=True, help="answer JSONL; the summary goes beside it")
    parser.set_defaults(func=_eval_command)
