"""Tests for `sd2_utils.distill`: planning, hygiene, generation, reference mode and resume.

The "target" here is SmolLM2-135M-Instruct with 16 new tokens, so the suite runs in a few
minutes on 2 CPU cores. The notebook and the benchmark run the 1.5B target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd2_utils import data, distill
from sd2_utils.distill import DistillConfig, HeldOutIndex

TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_NEW_TOKENS = 16
# Real ShareGPT conversations with short prompts, each with at least two user turns.
SHAREGPT_IDS = ("sharegpt-yn2eWCt_0", "sharegpt-VY7cMKG_0", "sharegpt-wNBG8Gp_51")
GSM8K_TRAIN_INDICES = (0, 1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def target():
    from sd2_utils.models import load_model

    return load_model(TARGET, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(target):
    return target[1]


@pytest.fixture(scope="module")
def held_out():
    return HeldOutIndex(distill.held_out_prompts())


@pytest.fixture(scope="module")
def sharegpt_rows():
    rows = {row["id"]: row for row in data.load_sharegpt().to_list()}
    return [rows[conversation_id] for conversation_id in SHAREGPT_IDS]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows))
    return path


def gsm8k_train_lines() -> list[dict]:
    lines = (data.SHARED_DATA_DIR / "gsm8k" / "train.jsonl").read_text().splitlines()
    return [json.loads(lines[index]) for index in GSM8K_TRAIN_INDICES]


# ---------------------------------------------------------------------------------------------
# Input records and planning


def test_normalize_conversation_malformed_records():
    cases = [
        ("not a record", "malformed: record is a str, not an object"),
        ({"id": "a"}, "malformed: no turns, conversations or question field"),
        ({"turns": "hello"}, "malformed: turns is not a list"),
        ({"turns": []}, "malformed: no turns"),
        ({"turns": [{"role": "user"}]}, "malformed: turn without role and content"),
        ({"turns": [{"role": "assistant", "content": "hi"}]},
         "malformed: roles do not alternate from a user turn"),
        ({"turns": [{"role": "user", "content": "  "}]}, "malformed: empty or non-text turn"),
        ({"turns": [{"role": "user", "content": 3}]}, "malformed: empty or non-text turn"),
        ({"turns": [{"role": "tool", "content": "x"}]}, "malformed: unknown role 'tool'"),
        ({"conversations": [{"from": "alien", "value": "x"}]},
         "malformed: unknown speaker 'alien'"),
    ]
    for row, reason in cases:
        conversation, received = distill.normalize_conversation(row, 0)
        assert conversation is None, row
        assert received == reason, row


def test_normalize_conversation_accepted_formats():
    sharegpt, _ = distill.normalize_conversation(
        {"id": "s1", "conversations": [{"from": "system", "value": "be brief"},
                                       {"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello"}]}, 0)
    assert sharegpt["turns"] == [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]
    gsm8k, _ = distill.normalize_conversation(gsm8k_train_lines()[0], 7)
    assert gsm8k["id"] == "row-7"
    assert gsm8k["source"] == "gsm8k"
    assert gsm8k["reference"] == "72"


def test_plan_malformed_file_counted(tmp_path, tokenizer, held_out):
    good = gsm8k_train_lines()[:2]
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        good[0],
        "{not json",
        {"id": "x", "turns": [{"role": "assistant", "content": "orphan answer"}]},
        {"id": "y"},
        good[1],
    ])
    rows = distill.load_source(str(path))
    config = DistillConfig(target=TARGET, dataset=str(path), batch_size=2)
    plan = distill.plan_conversations(rows, config, tokenizer, held_out)
    assert len(plan.ids) == 2
    assert plan.skipped == {
        "malformed: line 2: invalid JSON (Expecting property name enclosed in double quotes)": 1,
        "malformed: roles do not alternate from a user turn": 1,
        "malformed: no turns, conversations or question field": 1,
    }


def test_plan_duplicates_and_long_prompts_skipped(tokenizer, held_out):
    question = gsm8k_train_lines()[0]["question"]
    rows = [
        {"id": "a", "turns": [{"role": "user", "content": question}]},
        {"id": "b", "turns": [{"role": "user", "content": "  " + question.upper() + "\n"}]},
        {"id": "c", "turns": [{"role": "user", "content": "word " * 400}]},
        {"id": "d", "turns": [{"role": "user", "content": "What is a Python list?"}]},
    ]
    config = DistillConfig(target=TARGET, dataset="gsm8k", max_prompt_tokens=128, batch_size=8)
    plan = distill.plan_conversations(rows, config, tokenizer, held_out)
    assert sorted(plan.ids) == ["a", "d"] or sorted(plan.ids) == ["b", "d"]
    assert plan.skipped == {"duplicate prompt": 1, "prompt too long": 1}


def test_plan_same_seed_same_batches(tokenizer, held_out):
    rows = data.load_gsm8k("train").select(range(200)).to_list()
    config = DistillConfig(target=TARGET, dataset="gsm8k", num_samples=10, batch_size=4, seed=3)
    first = distill.plan_conversations(rows, config, tokenizer, held_out)
    second = distill.plan_conversations(rows, config, tokenizer, held_out)
    other = distill.plan_conversations(rows, DistillConfig(**{**config.__dict__, "seed": 4}),
                                       tokenizer, held_out)
    assert first.ids == second.ids
    assert first.ids != other.ids
    assert [len(batch) for batch in first.batches] == [4, 4, 2]
    lengths = [len(distill._template_ids(tokenizer, c["turns"][:1])) for c in
               (c for batch in first.batches for c in batch)]
    assert lengths == sorted(lengths, reverse=True)


# ---------------------------------------------------------------------------------------------
# Held-out hygiene


def test_held_out_index_reformatted_and_contained():
    spec_bench_prompt = data.load_spec_bench()[0]["turns"][0]["content"]
    gsm8k_test_question = data.load_gsm8k("test")[5]["turns"][0]["content"]
    index = HeldOutIndex(distill.held_out_prompts())
    assert index.find("\n  " + spec_bench_prompt.upper().replace(" ", "   ")) == "spec_bench"
    assert index.find(f"Please help with my homework. {gsm8k_test_question} Thanks!") in (
        "spec_bench", "gsm8k_test")
    assert index.find("Write a haiku about compilers.") is None


def test_plan_held_out_overlap_reported(tokenizer, held_out):
    mt_bench = data.load_mt_bench()[3]
    gsm8k_test = data.load_gsm8k("test")[0]
    rows = [
        {"id": "eval-copy", "turns": [{"role": "user", "content": mt_bench["turns"][0]["content"]}]},
        {"id": "eval-test", "turns": [{"role": "user", "content": gsm8k_test["turns"][0]["content"]}]},
        {"id": "clean", "turns": [{"role": "user", "content": "What is a Python list?"}]},
    ]
    config = DistillConfig(target=TARGET, dataset="gsm8k")
    plan = distill.plan_conversations(rows, config, tokenizer, held_out)
    assert plan.ids == ["clean"]
    assert sorted(plan.overlaps) == [("eval-copy", "spec_bench"), ("eval-test", "gsm8k_test")]
    assert plan.skipped == {"held-out overlap (spec_bench)": 1, "held-out overlap (gsm8k_test)": 1}


def test_run_distillation_rejects_evaluation_sets(tmp_path):
    with pytest.raises(ValueError, match="dataset 'spec_bench' is an evaluation set"):
        DistillConfig(target=TARGET, dataset="spec_bench")
    test_file = data.SHARED_DATA_DIR / "gsm8k" / "test.jsonl"
    lines = test_file.read_text().splitlines()[:5]
    path = write_jsonl(tmp_path / "copy_of_test.jsonl", [json.loads(line) for line in lines])
    with pytest.raises(ValueError, match=r"no usable conversation .*held-out overlap \(gsm8k_test\)': 5"):
        distill.run_distillation(DistillConfig(target=TARGET, dataset=str(path)), tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Reference mode helpers


def test_find_leak_phrases():
    assert distill.find_leak("Here's the rewritten answer: 42") == "here's the rewritten"
    assert distill.find_leak("As the Reference Answer says, 42.") == "reference answer"
    assert distill.find_leak("I hope your response time improves") == "your response"
    assert distill.find_leak("A list is an ordered, mutable sequence.") is None
    assert distill.find_leak("In the example above, the reference count drops to 0.") is None


def test_final_number_and_answers_match():
    assert distill.final_number("She pays $1,200.00 in total.") == "1200"
    assert distill.final_number("First 3, then 4.5") == "4.5"
    assert distill.final_number("So 48 + 24 = 72\n#### 72") == "72"
    assert distill.final_number("no digits") is None
    assert distill.answers_match("The answer is 72.", "72")
    assert not distill.answers_match("The answer is 71.", "72")
    assert not distill.answers_match("The answer is 72.", None)


def test_clean_reference_removes_calculator_annotations():
    answer = gsm8k_train_lines()[0]["answer"]
    cleaned = distill.clean_reference(answer)
    assert "<<" not in cleaned
    assert "####" not in cleaned
    assert cleaned.endswith("The answer is 72.")


# ---------------------------------------------------------------------------------------------
# Generation


def test_generate_batched_matches_batch1_fp32(target):
    model, tokenizer = target
    conversations = [
        [{"role": "user", "content": "What is a Python list?"}],
        [{"role": "user", "content": "Write a function that reverses a string in JavaScript, "
                                     "and explain how it handles Unicode surrogate pairs."}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": gsm8k_train_lines()[1]["question"]}],
    ]
    batched = distill.generate_responses(model, tokenizer, conversations, MAX_NEW_TOKENS)
    single = [distill.generate_responses(model, tokenizer, [c], MAX_NEW_TOKENS)[0]
              for c in conversations]
    prompt_lengths = [g.prompt_tokens for g in batched]
    assert len(set(prompt_lengths)) > 1, "the batch must need padding"
    for row, (together, alone) in enumerate(zip(batched, single)):
        assert together.text == alone.text, row
        assert together.completion_tokens == alone.completion_tokens, row
        assert together.prompt_tokens == alone.prompt_tokens, row
        assert together.finish_reason == alone.finish_reason, row


def test_generate_marks_truncation(target):
    model, tokenizer = target
    generations = distill.generate_responses(
        model, tokenizer, [[{"role": "user", "content": "Explain Python decorators in detail."}],
                           [{"role": "user", "content": "Hi"}]], 12)
    assert generations[0].finish_reason == "length"
    assert generations[0].completion_tokens == 12
    assert generations[1].finish_reason == "stop"
    assert 0 < generations[1].completion_tokens < 12


def test_distill_batch_later_turn_sees_target_answer(target, sharegpt_rows):
    model, tokenizer = target
    conversation, _ = distill.normalize_conversation(sharegpt_rows[0], 0)
    config = DistillConfig(target=TARGET, dataset="sharegpt", max_new_tokens=MAX_NEW_TOKENS,
                           dtype="float32")
    [record] = distill.distill_batch(model, tokenizer, [conversation], config, seed=0)
    assert [turn["role"] for turn in record["turns"]] == ["user", "assistant"] * 2
    assert record["turns"][0] == conversation["turns"][0]
    assert record["turns"][2] == conversation["turns"][2]
    assert record["turns"][1]["content"] != conversation["turns"][1]["content"]
    assert record["original_responses"] == [conversation["turns"][1]["content"],
                                            conversation["turns"][3]["content"]]
    # The second prompt contains the target's first answer, not the original one.
    expected_second = distill._template_ids(tokenizer, record["turns"][:3])
    assert record["prompt_tokens"][1] == len(expected_second)
    assert record["response_modes"] == ["regenerate", "regenerate"]


def test_distill_batch_reference_leak_falls_back(target, monkeypatch):
    model, tokenizer = target
    conversation, _ = distill.normalize_conversation(gsm8k_train_lines()[0], 0)
    config = DistillConfig(target=TARGET, dataset="gsm8k", max_new_tokens=MAX_NEW_TOKENS,
                           mode="reference", dtype="float32")
    plain = distill.generate_responses(model, tokenizer, [conversation["turns"][:1]],
                                       MAX_NEW_TOKENS)
    # Flag every reference-mode response as a leak, so each must be regenerated.
    monkeypatch.setattr(distill, "find_leak", lambda text: "reference answer")
    [record] = distill.distill_batch(model, tokenizer, [conversation], config, seed=0)
    assert record["response_modes"] == ["regenerate_after_leak"]
    assert record["turns"][1]["content"] == plain[0].text
    assert record["completion_tokens"] == [plain[0].completion_tokens]


def test_distill_batch_gsm8k_mismatch_filtered(target):
    model, tokenizer = target
    conversation, _ = distill.normalize_conversation(gsm8k_train_lines()[0], 0)
    conversation["reference"] = "-1"  # no response can end in this number
    config = DistillConfig(target=TARGET, dataset="gsm8k", max_new_tokens=MAX_NEW_TOKENS,
                           mode="reference", dtype="float32")
    [record] = distill.distill_batch(model, tokenizer, [conversation], config, seed=0)
    assert record["kept"] is False
    assert record["filter_reason"] == "final answer differs from reference"
    assert record["answer_matches_reference"] is False


# ---------------------------------------------------------------------------------------------
# The stage: output, summary, resume and settings check


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, target, sharegpt_rows):
    """A complete in-process run over 3 ShareGPT and 2 GSM8K rows, regenerate mode."""
    folder = tmp_path_factory.mktemp("distill")
    source = write_jsonl(folder / "source.jsonl", sharegpt_rows + gsm8k_train_lines()[:2])
    config = DistillConfig(target=TARGET, dataset=str(source), max_new_tokens=MAX_NEW_TOKENS,
                           batch_size=2, dtype="float32")
    model, tokenizer = target
    summary = distill.run_distillation(config, folder / "out", model=model, tokenizer=tokenizer)
    return config, folder / "out", summary


def test_run_distillation_summary_counts(finished_run):
    config, out, summary = finished_run
    assert summary["planned"] == 5
    assert summary["done"] == 5
    assert summary["complete"] is True
    assert summary["kept"] == 5
    records = distill.read_records(out)
    # Up to max_turns = 2 responses per conversation: GSM8K rows have one user turn.
    expected = 2 + sum(min(2, len(record["turns"]) // 2) for record in records
                       if record["source"] == "sharegpt")
    assert expected > 5, "the fixture must hold a multi-turn conversation"
    assert summary["responses"] == expected
    assert sum(summary["response_length_histogram"]["counts"]) == expected
    assert summary["response_length_histogram"]["edges"][-1] == MAX_NEW_TOKENS
    assert summary["tokens_per_second"] > 0
    assert summary["held_out_overlaps"] == []
    assert summary == distill.read_json(out / distill.SUMMARY_NAME)
    assert sorted(p.name for p in out.glob("shard-*.jsonl")) == [
        "shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]


def test_load_distilled_schema(finished_run):
    config, out, _ = finished_run
    dataset = distill.load_distilled(out)
    assert len(dataset) == 5
    for column in ("id", "source", "category", "turns", "reference", "prompt_tokens",
                   "completion_tokens", "finish_reason", "finish_reasons", "truncated",
                   "target", "generation", "original_responses"):
        assert column in dataset.column_names, column
    row = dataset[0]
    assert row["target"] == TARGET
    assert row["generation"]["fingerprint"] == config.fingerprint()
    assert row["generation"]["max_new_tokens"] == MAX_NEW_TOKENS
    for record in dataset:
        assert record["truncated"] == ("length" in record["finish_reasons"])
        for tokens, reason in zip(record["completion_tokens"], record["finish_reasons"]):
            assert (tokens == MAX_NEW_TOKENS) == (reason == "length")
    assert set(dataset["source"]) == {"sharegpt", "gsm8k"}


def test_run_distillation_finished_rerun_is_noop(finished_run):
    config, out, summary = finished_run
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.jsonl")}
    # No model is passed: a finished run must not load or call one.
    again = distill.run_distillation(config, out, tokenizer=None)
    assert again == summary
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.jsonl")} == before


def test_run_distillation_rejects_other_settings(finished_run):
    config, out, _ = finished_run
    changed = DistillConfig(**{**config.__dict__, "max_new_tokens": 32})
    with pytest.raises(ValueError, match=r"contains a distillation run with other settings "
                                         r"\(max_new_tokens: 16 -> 32\); rerun with the original"):
        distill.run_distillation(changed, out)


def test_cli_resume_after_kill(tmp_path):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_train_lines())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sd2_utils.cli", "distill", "--target", TARGET,
               "--dataset", str(source), "--max-new-tokens", str(MAX_NEW_TOKENS),
               "--batch-size", "1", "--dtype", "bfloat16", "--threads", "1", "--out", str(out)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    manifest_path = out / distill.MANIFEST_NAME
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        manifest = distill.read_json(manifest_path) if manifest_path.exists() else None
        if manifest and manifest["shards"]:
            break
        assert process.poll() is None, "the run ended before its first shard was listed"
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed = distill.read_json(manifest_path)
    assert 1 <= len(killed["shards"]) < len(GSM8K_TRAIN_INDICES)
    first_shard = sorted(killed["shards"])[0]
    first_bytes = (out / first_shard).read_bytes()

    rerun = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"conversations: {len(GSM8K_TRAIN_INDICES)} of {len(GSM8K_TRAIN_INDICES)} done" in rerun.stdout
    ids = [record["id"] for record in distill.read_records(out)]
    manifest = distill.read_json(manifest_path)
    assert sorted(ids) == sorted(manifest["planned_ids"])
    assert len(ids) == len(set(ids)) == len(GSM8K_TRAIN_INDICES)
    assert (out / first_shard).read_bytes() == first_bytes  # finished work is not redone
    assert not list(out.glob(".*.tmp"))


def test_cli_other_settings_clean_error(finished_run, capsys):
    from sd2_utils import cli

    config, out, _ = finished_run
    status = cli.main(["distill", "--target", config.target, "--dataset", config.dataset,
                       "--max-new-tokens", "32", "--batch-size", str(config.batch_size),
                       "--dtype", config.dtype, "--out", str(out)])
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("sd2 distill: error: ")
    assert "max_new_tokens: 16 -> 32" in error
    assert "pass a new --out directory" in error
