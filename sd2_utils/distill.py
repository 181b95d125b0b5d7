"""Self-data distillation: the target regenerates the responses of a fine-tuning set.

A draft fine-tuned on the target's own responses learns the target's distribution, which raises
the draft's acceptance rate in speculative decoding (SD², Lasby et al. 2025, arXiv 2504.08838;
self-data distillation as in Thangarasa et al. 2024, which follows SDFT, Yang et al. 2024).

Two modes:

- ``regenerate``: the target answers each user turn through its own chat template. A
  multi-turn conversation is regenerated turn by turn, and each later turn sees the target's
  earlier answers, not the original ones.
- ``reference``: the target rewrites the original answer, given it as a reference
  (``REFERENCE_TEMPLATE``). A response that leaks the prompt ("reference answer", "your
  response", ...) is replaced by a ``regenerate`` answer. For GSM8K a rewritten answer is kept
  only when its final number equals the reference number; other records are written with
  ``kept = False`` and counted.

Output folder (``sd2 distill --out DIR``):

- ``shard-NNNNN.jsonl``: one JSON record per conversation, one shard per generation batch,
  each written atomically (temporary file and rename).
- ``manifest.json``: the settings, their fingerprint, the planned ids and, per finished
  shard, its file name and ids. A shard counts as done only once the manifest lists it, so a
  kill at any moment loses at most the batch in flight, and a rerun of the same command
  continues from there. A rerun with other settings is rejected.
- ``summary.json``: written when every planned conversation is done: counts, skipped and
  filtered counts with reasons, held-out overlaps, response-length histogram, throughput.

Record format (one JSON object per line). The first five fields follow ``sd2_utils.data``:

- ``id``, ``source``, ``category``, ``reference``: copied from the source conversation.
- ``turns``: ``[{"role": "user"|"assistant", "content": str}, ...]``, the source's user turns
  with the target's responses as the assistant turns (text, so that any draft tokenizer can
  re-tokenize it).
- ``original_responses``: the source's assistant text for each answered turn (None where the
  source has none).
- ``response_modes``: per assistant turn, ``regenerate``, ``reference`` or
  ``regenerate_after_leak``.
- ``prompt_tokens``, ``completion_tokens``: per assistant turn, target tokens of the templated
  prompt and of the response (the closing end-of-sequence token is not counted).
- ``finish_reasons``: per assistant turn, ``stop`` (end-of-sequence token) or ``length``
  (cut at ``max_new_tokens``); ``finish_reason`` is ``length`` if any turn was cut, and
  ``truncated`` is the same as a bool.
- ``num_source_turns``: user turns in the source conversation; ``turns_dropped_reason`` says
  why fewer were answered (``max_turns``, ``prompt_too_long``) or is None.
- ``kept``, ``filter_reason``: whether the record belongs in the fine-tuning set, and why not.
- ``answer_matches_reference``: for GSM8K, whether the final number of the last response
  equals the reference number; None for other sources.
- ``target``: the target model's name; ``generation``: the settings (``DistillConfig``) and
  their ``fingerprint``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .io import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "summary.json"
SHARD_TEMPLATE = "shard-{index:05d}.jsonl"
FORMAT_VERSION = 1
MODES = ("regenerate", "reference")
NAMED_DATASETS = ("sharegpt", "gsm8k")
# Names of evaluation sets: distilling on them would leak benchmark prompts into training data.
EVALUATION_DATASETS = ("spec_bench", "spec-bench", "mt_bench", "mt-bench", "gsm8k_test",
                       "gsm8k-test", "humaneval")

# The reference-mode prompt (chosen wording, in the spirit of SDFT's distillation template):
# the original answer is shown as a guide, and the target answers in its own words.
REFERENCE_TEMPLATE = (
    "{prompt}\n\n"
    "---\n"
    "Below is an example answer to the request above. Use it as a guide for the content, but "
    "write the answer in your own words and style. Reply with the answer only, and do not "
    "mention this example.\n\n"
    "Example answer:\n{reference}"
)

# Phrases that show a reference-mode response is talking about its prompt instead of answering
# the user (chosen list; each is matched case-insensitively as a phrase). Broader phrases such as
# "the reference" or "the example" are left out: code answers use them in their own sense.
LEAK_PHRASES = (
    "reference answer",
    "example answer",
    "provided answer",
    "original answer",
    "your response",
    "my response",
    "rewritten answer",
    "rewrite the answer",
    "in my own words",
    "in your own words",
    "here is the rewritten",
    "here's the rewritten",
    "as a guide",
)
_LEAK_PATTERN = re.compile("|".join(re.escape(phrase) for phrase in LEAK_PHRASES), re.IGNORECASE)

# Eval prompts at least this long (normalized characters) are also searched for inside training
# prompts, which catches a benchmark question pasted into a longer message. Shorter ones, such
# as MT-Bench follow-ups, match only as a whole prompt (chosen default: short generic follow-ups
# would otherwise match many unrelated prompts).
MIN_CONTAINED_PROMPT_CHARS = 64
# GSM8K calculator annotations such as `<<48/2=24>>`: not natural text, so the reference shown to
# the target drops them.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run, all fingerprinted because each can change the data.

    The batch size is included too: padding changes bfloat16 rounding and the sampling
    seeds follow the batches.

    Args:
        target: target model name (Hub id or local directory, see ``sd2_utils.models``).
        dataset: ``sharegpt``, ``gsm8k`` (train split) or the path of a JSON/JSONL file.
        num_samples: conversations to distill (None: every usable one).
        max_new_tokens: token limit of each response; a response cut there is marked ``length``.
        mode: ``regenerate`` or ``reference``.
        seed: seed of the conversation draw and of sampling.
        batch_size: conversations generated together (left padding, sorted by prompt length).
        dtype: ``bfloat16`` or ``float32``.
        max_prompt_tokens: a conversation whose first templated prompt is longer is skipped
            and counted. A later turn over the limit ends the conversation there
            (``turns_dropped_reason = "prompt_too_long"``).
        max_turns: user turns answered per conversation, from the first.
        temperature: 0 for greedy decoding, else the sampling temperature.
    """

    target: str
    dataset: str
    num_samples: int | None = None
    max_new_tokens: int = 256
    mode: str = "regenerate"
    seed: int = 0
    batch_size: int = 8
    dtype: str = "bfloat16"
    max_prompt_tokens: int = 1024
    max_turns: int = 2
    temperature: float = 0.0

    def __post_init__(self) -> None:
        _reject_evaluation_dataset(self.dataset)
        if self.mode not in MODES:
            raise ValueError(f"invalid mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"invalid dtype {self.dtype!r}; use bfloat16 or float32")
        positive = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                    "max_prompt_tokens": self.max_prompt_tokens, "max_turns": self.max_turns}
        if self.num_samples is not None:
            positive["num_samples"] = self.num_samples
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")

    def settings(self) -> dict[str, Any]:
        """Return the settings that define the data, with a content hash for a dataset file."""
        settings = dataclasses.asdict(self)
        if self.dataset not in NAMED_DATASETS:
            settings["dataset_sha256"] = _file_sha256(Path(self.dataset))
            settings["dataset"] = str(Path(self.dataset).resolve())
        return settings

    def fingerprint(self) -> str:
        return settings_fingerprint(self.settings())


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {str(path)!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor "
            f"an existing file; pass a name or the path of a JSON or JSONL file"
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Source conversations


def load_source(dataset: str) -> list[dict]:
    """Load the conversations to distill, in the schema of ``sd2_utils.data``.

    Args:
        dataset: ``sharegpt``, ``gsm8k`` (the train split) or a JSON/JSONL file whose records
            use the ``sd2_utils.data`` schema (``turns``), ShareGPT's (``conversations`` of
            ``{"from", "value"}``) or GSM8K's (``question`` and ``answer``).

    Returns:
        Raw rows, possibly malformed: ``plan_conversations`` validates each one.
    """
    from . import data

    _reject_evaluation_dataset(dataset)
    name = dataset.lower()
    if name == "sharegpt":
        return data.load_sharegpt().to_list()
    if name == "gsm8k":
        return data.load_gsm8k("train").to_list()
    path = Path(dataset)
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {dataset!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor an "
            f"existing file; pass a name or the path of a JSON or JSONL file"
        )
    return _read_records(path)


def _reject_evaluation_dataset(dataset: str) -> None:
    if dataset.lower() in EVALUATION_DATASETS:
        raise ValueError(
            f"dataset {dataset!r} is an evaluation set; distilling on it would leak benchmark "
            f"prompts into the drafts' training data. Use sharegpt, gsm8k (train) or a file"
        )


def _read_records(path: Path) -> list:
    """Read a JSON array or JSONL file; a line that is not valid JSON becomes a malformed row."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        return records
    rows: list = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            rows.append(_MalformedLine(f"line {line_number}: invalid JSON ({error.msg})"))
    return rows


@dataclasses.dataclass
class _MalformedLine:
    reason: str


def normalize_conversation(row: Any, index: int) -> tuple[dict | None, str | None]:
    """Bring one source row into the ``sd2_utils.data`` schema.

    Args:
        row: a record in the project schema, ShareGPT's or GSM8K's.
        index: position in the source, used as the id when the row has none.

    Returns:
        (conversation, None) for a usable row, or (None, reason) for a malformed one. A usable
        conversation starts with a user turn, alternates roles, and has no empty turn.
    """
    from .data import SHAREGPT_ROLES, gsm8k_final_answer

    if isinstance(row, _MalformedLine):
        return None, f"malformed: {row.reason}"
    if not isinstance(row, dict):
        return None, f"malformed: record is a {type(row).__name__}, not an object"
    row_id = str(row.get("id", f"row-{index}"))
    source = str(row.get("source") or "file")
    category = str(row.get("category") or source)
    reference = row.get("reference")

    if "turns" in row:
        raw_turns = row["turns"]
        if not isinstance(raw_turns, list):
            return None, "malformed: turns is not a list"
        turns = []
        for turn in raw_turns:
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                return None, "malformed: turn without role and content"
            turns.append({"role": turn["role"], "content": turn["content"]})
    elif "conversations" in row:
        raw_turns = row["conversations"]
        if not isinstance(raw_turns, list):
            return None, "malformed: conversations is not a list"
        turns = []
        for message in raw_turns:
            if not isinstance(message, dict):
                return None, "malformed: message is not an object"
            speaker = str(message.get("from", "")).lower()
            if speaker == "system":
                continue
            if speaker not in SHAREGPT_ROLES:
                return None, f"malformed: unknown speaker {speaker!r}"
            turns.append({"role": SHAREGPT_ROLES[speaker], "content": message.get("value")})
    elif "question" in row and "answer" in row:
        turns = [{"role": "user", "content": row["question"]},
                 {"role": "assistant", "content": row["answer"]}]
        if isinstance(row["answer"], str) and "####" in row["answer"]:
            source = "gsm8k" if source == "file" else source
            reference = gsm8k_final_answer(row["answer"])
    else:
        return None, "malformed: no turns, conversations or question field"

    if not turns:
        return None, "malformed: no turns"
    for position, turn in enumerate(turns):
        if turn["role"] not in ("user", "assistant"):
            return None, f"malformed: unknown role {turn['role']!r}"
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            return None, "malformed: empty or non-text turn"
        expected = "user" if position % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return None, "malformed: roles do not alternate from a user turn"
    if reference is not None and not isinstance(reference, str):
        reference = str(reference)
    return {"id": row_id, "source": source, "category": category, "turns": turns,
            "reference": reference}, None


def user_turns(conversation: dict) -> list[str]:
    return [turn["content"] for turn in conversation["turns"] if turn["role"] == "user"]


def original_responses(conversation: dict) -> list[str | None]:
    """Return the source's assistant text after each user turn (None where there is none)."""
    responses: list[str | None] = []
    for position, turn in enumerate(conversation["turns"]):
        if turn["role"] == "user":
            following = conversation["turns"][position + 1:position + 2]
            responses.append(following[0]["content"] if following else None)
    return responses


# ---------------------------------------------------------------------------------------------
# Held-out hygiene


def held_out_prompts() -> dict[str, str]:
    """Map each normalized evaluation prompt to the evaluation set that contains it.

    Covers every user turn of Spec-Bench, MT-Bench and the GSM8K test split.
    """
    from . import data

    loaders = (("spec_bench", data.load_spec_bench), ("mt_bench", data.load_mt_bench),
               ("gsm8k_test", lambda: data.load_gsm8k("test")))
    held_out: dict[str, str] = {}
    for name, loader in loaders:
        for turns in loader()["turns"]:
            for turn in turns:
                if turn["role"] == "user":
                    held_out.setdefault(data.normalize_prompt(turn["content"]), name)
    return held_out


class HeldOutIndex:
    """Finds evaluation prompts inside training prompts, after normalization.

    A training prompt overlaps when it equals an evaluation prompt, or contains one of at
    least ``MIN_CONTAINED_PROMPT_CHARS`` characters as a run of whole words. Containment is
    looked up through each long evaluation prompt's first ``ANCHOR_WORDS`` words, so the cost
    per training prompt grows with its length, not with the number of evaluation prompts.
    """

    ANCHOR_WORDS = 6

    def __init__(self, held_out: dict[str, str]):
        self.exact = held_out
        self.by_anchor: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for text, name in held_out.items():
            words = tuple(text.split())
            if len(text) >= MIN_CONTAINED_PROMPT_CHARS and len(words) >= self.ANCHOR_WORDS:
                self.by_anchor.setdefault(words[:self.ANCHOR_WORDS], []).append((text, name))

    def find(self, prompt: str) -> str | None:
        """Return the name of the evaluation set that `prompt` overlaps, or None."""
        from .data import normalize_prompt

        text = normalize_prompt(prompt)
        if text in self.exact:
            return self.exact[text]
        words = text.split()
        for start in range(len(words) - self.ANCHOR_WORDS + 1):
            for held_out_text, name in self.by_anchor.get(tuple(words[start:start + self.ANCHOR_WORDS]), ()):
                if f" {held_out_text} " in f" {text} ":
                    return name
        return None


# ---------------------------------------------------------------------------------------------
# Planning: choose, validate and batch the conversations


@dataclasses.dataclass
class Plan:
    """The conversations to distill, in batches, and what was left out on the way.

    Attributes:
        batches: conversations per batch, each batch sorted by first prompt length; the
            position of a batch in this list names its shard.
        skipped: reason -> count of source conversations left out.
        overlaps: (conversation id, evaluation set) for every held-out overlap found.
        scanned: source conversations examined to fill the plan.
    """

    batches: list[list[dict]]
    skipped: Counter
    overlaps: list[tuple[str, str]]
    scanned: int

    @property
    def ids(self) -> list[str]:
        return [conversation["id"] for batch in self.batches for conversation in batch]


def plan_conversations(
    rows: Sequence[Any],
    config: DistillConfig,
    tokenizer,
    held_out: HeldOutIndex,
) -> Plan:
    """Draw, validate, de-duplicate and batch up to ``config.num_samples`` conversations.

    Rows are visited in a seeded random order until enough usable conversations are found, so
    the same seed gives the same plan. Malformed rows, duplicate prompts (same normalized user
    turns), prompts that overlap an evaluation set and first prompts longer than
    ``max_prompt_tokens`` are skipped and counted. The chosen conversations are sorted by the
    token length of their first templated prompt, longest first, and cut into batches.
    """
    from .data import normalize_prompt

    order = np.random.default_rng(config.seed).permutation(len(rows))
    skipped: Counter = Counter()
    overlaps: list[tuple[str, str]] = []
    seen_prompts: set[tuple[str, ...]] = set()
    seen_ids: set[str] = set()
    chosen: list[tuple[int, dict]] = []
    scanned = 0
    for index in order.tolist():
        if config.num_samples is not None and len(chosen) >= config.num_samples:
            break
        scanned += 1
        conversation, reason = normalize_conversation(rows[index], index)
        if conversation is None:
            skipped[reason] += 1
            continue
        prompts = user_turns(conversation)[:config.max_turns]
        overlap = next((name for name in map(held_out.find, prompts) if name), None)
        if overlap is not None:
            skipped[f"held-out overlap ({overlap})"] += 1
            overlaps.append((conversation["id"], overlap))
            continue
        key = tuple(normalize_prompt(prompt) for prompt in prompts)
        if key in seen_prompts:
            skipped["duplicate prompt"] += 1
            continue
        if conversation["id"] in seen_ids:
            skipped["duplicate id"] += 1
            continue
        length = len(_template_ids(tokenizer, [{"role": "user", "content": prompts[0]}]))
        if length > config.max_prompt_tokens:
            skipped["prompt too long"] += 1
            continue
        seen_prompts.add(key)
        seen_ids.add(conversation["id"])
        chosen.append((length, conversation))

    if overlaps:
        logger.warning("Left out %d conversations that overlap evaluation prompts: %s",
                       len(overlaps), ", ".join(f"{i} ({name})" for i, name in overlaps[:10]))
    if config.num_samples is not None and len(chosen) < config.num_samples:
        logger.warning("Only %d usable conversations for num_samples=%d (skipped: %s)",
                       len(chosen), config.num_samples, dict(skipped))
    # Longest first: the largest batch memory shows up at the start, not after an hour.
    chosen.sort(key=lambda item: -item[0])
    conversations = [conversation for _, conversation in chosen]
    batches = [conversations[start:start + config.batch_size]
               for start in range(0, len(conversations), config.batch_size)]
    return Plan(batches=batches, skipped=skipped, overlaps=overlaps, scanned=scanned)


# ---------------------------------------------------------------------------------------------
# Batched generation


@dataclasses.dataclass
class Generation:
    """One response: text, token counts and why generation stopped (``stop`` or ``length``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Return every token id that ends a response (generation config and tokenizer)."""
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = []
    elif isinstance(ids, int):
        ids = [ids]
    else:
        ids = list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_responses(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[Generation]:
    """Generate one response per conversation in a single left-padded batch.

    Each row stops at its own end-of-sequence token; the batch runs until every row has
    stopped or reached `max_new_tokens`. ``generate`` (transformers 5) derives position ids
    from the attention mask, so a row's greedy tokens do not depend on the padding that its
    batch adds (tested in fp32).

    Args:
        conversations: chat messages per row (the last one a user turn).
        temperature: 0 for greedy decoding, else sampling at that temperature.
        seed: seeds the sampler (unused when greedy).

    Returns:
        One ``Generation`` per row, in input order.
    """
    import torch

    prompts = [tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                             tokenize=False) for messages in conversations]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    input_ids = encoded["input_ids"].to(model.device)  # (batch, prompt_length)
    attention_mask = encoded["attention_mask"].to(model.device)  # (batch, prompt_length)
    eos_ids = eos_token_ids(model, tokenizer)

    sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    new_tokens = output[:, input_ids.shape[1]:].tolist()  # (batch, <= max_new_tokens)

    generations = []
    for row, tokens in enumerate(new_tokens):
        stop = next((position for position, token in enumerate(tokens) if token in eos_ids), None)
        completion = tokens if stop is None else tokens[:stop]
        generations.append(Generation(
            text=tokenizer.decode(completion, skip_special_tokens=True),
            prompt_tokens=int(attention_mask[row].sum()),
            completion_tokens=len(completion),
            finish_reason="length" if stop is None else "stop",
        ))
    return generations


# ---------------------------------------------------------------------------------------------
# Reference mode: prompt, leak filter and GSM8K answer check


def build_reference_prompt(prompt: str, reference: str) -> str:
    """Return the user turn that shows the target the original answer as a guide."""
    return REFERENCE_TEMPLATE.format(prompt=prompt, reference=reference.strip())


def clean_reference(text: str) -> str:
    """Remove GSM8K calculator annotations and turn the ``#### N`` line into a sentence."""
    text = _CALCULATOR_ANNOTATION.sub("", text)
    return re.sub(r"####\s*(\S+)\s*$", r"The answer is \1.", text.strip())


def find_leak(response: str) -> str | None:
    """Return the first prompt-leaking phrase in `response` (lowercase), or None."""
    match = _LEAK_PATTERN.search(response)
    return match.group(0).lower() if match else None


def final_number(text: str) -> str | None:
    """Return the last number in `text`, without thousands separators or a trailing `.0`."""
    marked = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    numbers = [marked.group(1)] if marked else _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return _canonical_number(value)


def _canonical_number(value: str) -> str | None:
    try:
        number = float(value)
    except ValueError:
        return None
    if math.isfinite(number) and number == int(number):
        return str(int(number))
    return repr(number)


def answers_match(response: str, reference: str | None) -> bool:
    """Return True when the final number of `response` equals the reference number."""
    if reference is None:
        return False
    expected = _canonical_number(reference.replace(",", ""))
    return expected is not None and final_number(response) == expected


def is_gsm8k(conversation: dict) -> bool:
    return conversation["source"] == "gsm8k"


# ---------------------------------------------------------------------------------------------
# Distilling one batch


def distill_batch(model, tokenizer, batch: list[dict], config: DistillConfig, seed: int) -> list[dict]:
    """Distill a batch of conversations turn by turn and return one record per conversation.

    Turn k of every conversation that has one is generated in one call, with the target's own
    earlier answers in the history.
    """
    histories: list[list[dict]] = [[] for _ in batch]
    details: list[dict] = [
        {"original_responses": [], "response_modes": [], "prompt_tokens": [],
         "completion_tokens": [], "finish_reasons": [], "turns_dropped_reason": None}
        for _ in batch
    ]
    prompts = [user_turns(conversation) for conversation in batch]
    originals = [original_responses(conversation) for conversation in batch]
    for conversation, detail in zip(batch, details):
        if len(user_turns(conversation)) > config.max_turns:
            detail["turns_dropped_reason"] = "max_turns"

    for turn_index in range(config.max_turns):
        active = []
        for row, detail in enumerate(details):
            if turn_index >= len(prompts[row]) or detail["turns_dropped_reason"] == "prompt_too_long":
                continue
            messages = histories[row] + [{"role": "user", "content": prompts[row][turn_index]}]
            if turn_index > 0 and len(_template_ids(tokenizer, messages)) > config.max_prompt_tokens:
                detail["turns_dropped_reason"] = "prompt_too_long"
                continue
            active.append(row)
        if not active:
            break
        turn_seed = seed * 1000 + turn_index
        responses, modes = _respond(model, tokenizer, active, histories, prompts, originals,
                                    turn_index, config, turn_seed)
        for row, generation, mode in zip(active, responses, modes):
            histories[row] += [{"role": "user", "content": prompts[row][turn_index]},
                               {"role": "assistant", "content": generation.text}]
            detail = details[row]
            detail["original_responses"].append(originals[row][turn_index])
            detail["response_modes"].append(mode)
            detail["prompt_tokens"].append(generation.prompt_tokens)
            detail["completion_tokens"].append(generation.completion_tokens)
            detail["finish_reasons"].append(generation.finish_reason)

    generation_settings = {**config.settings(), "fingerprint": config.fingerprint()}
    records = []
    for conversation, history, detail in zip(batch, histories, details):
        records.append(_record(conversation, history, detail, config, generation_settings))
    return records


def _respond(model, tokenizer, active, histories, prompts, originals, turn_index, config, seed):
    """Generate turn `turn_index` for the `active` rows; return (generations, modes)."""
    use_reference = [config.mode == "reference" and originals[row][turn_index] is not None
                     for row in active]
    messages = []
    for row, reference in zip(active, use_reference):
        user = prompts[row][turn_index]
        if reference:
            user = build_reference_prompt(user, clean_reference(originals[row][turn_index]))
        messages.append(histories[row] + [{"role": "user", "content": user}])
    generations = generate_responses(model, tokenizer, messages, config.max_new_tokens,
                                     config.temperature, seed)
    modes = ["reference" if reference else "regenerate" for reference in use_reference]

    leaked = [position for position, generation in enumerate(generations)
              if modes[position] == "reference" and find_leak(generation.text)]
    if leaked:
        logger.info("%d of %d reference-mode responses leak the prompt; regenerating them",
                    len(leaked), len(generations))
        plain = [histories[active[position]] + [{"role": "user",
                                                 "content": prompts[active[position]][turn_index]}]
                 for position in leaked]
        retries = generate_responses(model, tokenizer, plain, config.max_new_tokens,
                                     config.temperature, seed + 500)
        for position, retry in zip(leaked, retries):
            generations[position] = retry
            modes[position] = "regenerate_after_leak"
    return generations, modes


def _record(conversation, history, detail, config, generation_settings) -> dict:
    finish_reasons = detail["finish_reasons"]
    kept, filter_reason, matches = True, None, None
    if not finish_reasons:
        kept, filter_reason = False, "no turn answered"
    elif is_gsm8k(conversation):
        matches = answers_match(history[-1]["content"], conversation["reference"])
        if config.mode == "reference" and not matches:
            kept, filter_reason = False, "final answer differs from reference"
    truncated = "length" in finish_reasons
    return {
        "id": conversation["id"],
        "source": conversation["source"],
        "category": conversation["category"],
        "turns": history,
        "reference": conversation["reference"],
        **detail,
        "finish_reason": "length" if truncated else "stop",
        "truncated": truncated,
        "num_source_turns": len(user_turns(conversation)),
        "kept": kept,
        "filter_reason": filter_reason,
        "answer_matches_reference": matches,
        "target": config.target,
        "generation": generation_settings,
    }


# ---------------------------------------------------------------------------------------------
# The resumable stage


def _batch_seed(seed: int, batch_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()[:4], "little")


def _check_manifest(manifest: dict, settings: dict, fingerprint: str, out_dir: Path) -> None:
    if manifest.get("fingerprint") == fingerprint:
        return
    previous = manifest.get("settings", {})
    differences = [f"{key}: {previous.get(key)!r} -> {settings.get(key)!r}"
                   for key in sorted(set(previous) | set(settings))
                   if previous.get(key) != settings.get(key)]
    raise ValueError(
        f"{out_dir} contains a distillation run with other settings ({'; '.join(differences)}); "
        f"rerun with the original settings to resume it, or pass a new --out directory"
    )


def run_distillation(config: DistillConfig, out_dir: str | os.PathLike, model=None,
                     tokenizer=None) -> dict:
    """Distill ``config.dataset`` with ``config.target`` into `out_dir`, resuming if possible.

    Args:
        config: the run's settings.
        out_dir: output folder (shards, ``manifest.json``, ``summary.json``).
        model, tokenizer: an already loaded target (loaded from ``config.target`` when None).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        ValueError: `out_dir` contains a run with other settings, or no usable conversation
            remains.
    """
    from tqdm.auto import tqdm

    from .models import load_model, load_tokenizer

    out_dir = Path(out_dir)
    settings = config.settings()
    fingerprint = settings_fingerprint(settings)
    manifest_path = out_dir / MANIFEST_NAME
    manifest = read_json(manifest_path)
    if manifest is not None:
        _check_manifest(manifest, settings, fingerprint, out_dir)

    if tokenizer is None:
        tokenizer = load_tokenizer(config.target)
    rows = load_source(config.dataset)
    plan = plan_conversations(rows, config, tokenizer, HeldOutIndex(held_out_prompts()))
    if not plan.batches:
        raise ValueError(
            f"no usable conversation in dataset {config.dataset!r} (skipped: {dict(plan.skipped)}); "
            f"check the file's format or the held-out overlap report"
        )
    if manifest is None:
        manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                    "settings": settings, "planned_ids": plan.ids, "shards": {},
                    "versions": _versions()}
        atomic_write_json(manifest_path, manifest)
    elif manifest["planned_ids"] != plan.ids:
        raise RuntimeError(
            f"the plan for {out_dir} changed although its settings did not (was the source data "
            f"set updated?); distill into a new --out directory"
        )

    # A kill during an atomic write leaves its temporary file behind; nothing reads those.
    # NOTE: this assumes one writer per folder. Two runs into the same folder at once are
    # not detected.
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    done_shards = manifest["shards"]
    pending = [index for index in range(len(plan.batches))
               if SHARD_TEMPLATE.format(index=index) not in done_shards]
    logger.info("Distilling %d conversations into %s: %d of %d batches already done",
                len(plan.ids), out_dir, len(plan.batches) - len(pending), len(plan.batches))
    if pending and model is None:
        # NOTE: the target is loaded on one device (CPU by default); a target too large for
        # one device, such as a 70B model, needs a multi-device placement that this does not do.
        model, tokenizer = load_model(config.target, dtype=config.dtype)
    for index in tqdm(pending, desc="distill batches", unit="batch"):
        batch = plan.batches[index]
        started = time.perf_counter()
        records = distill_batch(model, tokenizer, batch, config, _batch_seed(config.seed, index))
        seconds = time.perf_counter() - started
        shard = SHARD_TEMPLATE.format(index=index)
        atomic_write_text(out_dir / shard, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                   for r in records))
        generated = sum(sum(record["completion_tokens"]) for record in records)
        # The manifest is written after the shard: a shard it does not list is rewritten.
        done_shards[shard] = {"ids": [r["id"] for r in records], "seconds": round(seconds, 3),
                              "generated_tokens": generated}
        atomic_write_json(manifest_path, manifest)
        logger.debug("%s: %d records, %d tokens in %.1f s", shard, len(records), generated, seconds)

    summary = summarize(out_dir, plan)
    atomic_write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "transformers", "datasets", "sd2"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


# ---------------------------------------------------------------------------------------------
# Reading the output


def read_records(directory: str | os.PathLike) -> list[dict]:
    """Read every record of the shards that ``manifest.json`` lists, in shard order."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST_NAME)
    if manifest is None:
        raise FileNotFoundError(
            f"{directory / MANIFEST_NAME} not found; run `sd2 distill --out {directory}` first"
        )
    records = []
    for shard in sorted(manifest["shards"]):
        with (directory / shard).open(encoding="utf-8") as handle:
            records.extend(json.loads(line) for line in handle if line.strip())
    return records


def load_distilled(directory: str | os.PathLike, include_filtered: bool = False):
    """Load a distilled folder as a ``datasets.Dataset`` (record format in the module docstring).

    Args:
        directory: the ``--out`` folder of ``sd2 distill``.
        include_filtered: also return records with ``kept = False`` (GSM8K answer mismatches).

    Returns:
        One row per conversation with ``id``, ``source``, ``category``, ``turns`` (the target's
        responses as assistant turns), ``reference`` and the generation fields.
    """
    import datasets

    records = read_records(directory)
    if not include_filtered:
        records = [record for record in records if record["kept"]]
    if not records:
        raise ValueError(f"{directory} contains no {'' if include_filtered else 'kept '}records")
    return datasets.Dataset.from_list(records)


def side_by_side(directory: str | os.PathLike, num_rows: int = 5, max_chars: int = 400):
    """Tabulate the first turns of `num_rows` records: prompt, original and target's answer.

    Returns:
        A ``pandas.DataFrame`` with columns ``id``, ``prompt``, ``original``, ``target``,
        ``target_tokens`` and ``finish_reason``; texts are cut at `max_chars` characters.
    """
    import pandas as pd

    def cut(text: str | None) -> str:
        if text is None:
            return ""
        return text if len(text) <= max_chars else text[:max_chars] + " [...]"

    rows = []
    for record in [r for r in read_records(directory) if len(r["turns"]) >= 2][:num_rows]:
        rows.append({
            "id": record["id"],
            "prompt": cut(record["turns"][0]["content"]),
            "original": cut(record["original_responses"][0]),
            "target": cut(record["turns"][1]["content"]),
            "target_tokens": record["completion_tokens"][0],
            "finish_reason": record["finish_reasons"][0],
        })
    return pd.DataFrame(rows)


def response_length_histogram(lengths: Iterable[int], max_new_tokens: int, bins: int = 8) -> dict:
    """Count responses per token-length bin from 0 to `max_new_tokens` (upper edge inclusive)."""
    counts, edges = np.histogram(list(lengths), bins=bins, range=(0, max_new_tokens))
    return {"edges": [int(edge) for edge in edges], "counts": [int(count) for count in counts]}


def summarize(directory: str | os.PathLike, plan: Plan | None = None) -> dict:
    """Summarize a distilled folder: counts, reasons, lengths, throughput.

    Args:
        plan: the run's plan, for the skipped counts and overlaps (read from
            ``summary.json`` when None).
    """
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST_NAME)
    records = read_records(directory)
    settings = manifest["settings"]
    if plan is None:
        previous = read_json(directory / SUMMARY_NAME, default={})
        skipped = previous.get("skipped", {})
        overlaps = previous.get("held_out_overlaps", [])
        scanned = previous.get("scanned")
    else:
        skipped = dict(plan.skipped)
        overlaps = [{"id": conversation_id, "evaluation_set": name}
                    for conversation_id, name in plan.overlaps]
        scanned = plan.scanned
    lengths = [tokens for record in records for tokens in record["completion_tokens"]]
    modes = Counter(mode for record in records for mode in record["response_modes"])
    filtered = Counter(record["filter_reason"] for record in records if not record["kept"])
    seconds = sum(shard["seconds"] for shard in manifest["shards"].values())
    generated = sum(shard["generated_tokens"] for shard in manifest["shards"].values())
    done = len(records)
    planned = len(manifest["planned_ids"])
    gsm8k = [record for record in records if record["answer_matches_reference"] is not None]
    return {
        "settings": settings,
        "fingerprint": manifest["fingerprint"],
        "planned": planned,
        "done": done,
        "complete": done == planned,
        "kept": sum(record["kept"] for record in records),
        "filtered": dict(filtered),
        "skipped": skipped,
        "scanned": scanned,
        "held_out_overlaps": overlaps,
        "responses": len(lengths),
        "truncated_responses": sum(r.count("length") for r in
                                   (record["finish_reasons"] for record in records)),
        "response_modes": dict(modes),
        "leak_fallbacks": modes.get("regenerate_after_leak", 0),
        "gsm8k_answer_matches": sum(bool(r["answer_matches_reference"]) for r in gsm8k),
        "gsm8k_records": len(gsm8k),
        "mean_response_tokens": float(np.mean(lengths)) if lengths else 0.0,
        "response_length_histogram": response_length_histogram(lengths, settings["max_new_tokens"]),
        "generated_tokens": generated,
        "generation_seconds": round(seconds, 2),
        "tokens_per_second": round(generated / seconds, 3) if seconds else None,
    }


# ---------------------------------------------------------------------------------------------
# Command line


def format_summary(summary: dict) -> str:
    lines = [
        f"conversations: {summary['done']} of {summary['planned']} done, {summary['kept']} kept",
        f"responses: {summary['responses']} ({summary['truncated_responses']} cut at "
        f"max_new_tokens), mean {summary['mean_response_tokens']:.1f} tokens",
        f"skipped: {summary['skipped'] or 'none'}",
        f"filtered: {summary['filtered'] or 'none'}",
        f"held-out overlaps: {len(summary['held_out_overlaps'])}",
        f"response modes: {summary['response_modes']}",
        f"throughput: {summary['generated_tokens']} tokens in {summary['generation_seconds']} s "
        f"({summary['tokens_per_second']} tokens/s)",
    ]
    return "\n".join(lines)


def _distill(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = DistillConfig(
        target=args.target, dataset=args.dataset, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, mode=args.mode, seed=args.seed,
        batch_size=args.batch_size, dtype=args.dtype, max_prompt_tokens=args.max_prompt_tokens,
        max_turns=args.max_turns, temperature=args.temperature,
    )
    summary = run_distillation(config, args.out)
    print(format_summary(summary))
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill", help="regenerate a fine-tuning set's responses with the target (resumable)")
    parser.add_argument("--target", required=True, help="target model: Hub id or local directory")
    parser.add_argument("--dataset", required=True,
                        help="sharegpt, gsm8k (train split) or the path of a JSON/JSONL file")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="conversations to distill (default: every usable one)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="token limit of each response (default: 256)")
    parser.add_argument("--mode", choices=MODES, default="regenerate",
                        help="regenerate: answer each user turn; reference: rewrite the original "
                             "answer given as a reference (default: regenerate)")
    parser.add_argument("--out", required=True, help="output folder; rerun to resume")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw and of sampling")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="conversations generated together (default: 8)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the target's weights (default: bfloat16)")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024,
                        help="skip prompts longer than this many tokens (default: 1024)")
    parser.add_argument("--max-turns", type=int, default=2,
                        help="user turns answered per conversation (default: 2)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 for greedy decoding (default), else the sampling temperature")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=_distill)
