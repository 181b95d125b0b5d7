"""Tests for the benchmark runner: answer files, resume, summary, errors, transformers cross-check."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import QWEN_DRAFT_ID, SMOLLM_ID
from sd2_utils import evaluate
from sd2_utils.cli import main
from sd2_utils.evaluate import EvalSettings, read_answers, run_evaluation, transformers_assisted_generate
from sd2_utils.models import load_model, resolve
from sd2_utils.speculative import speculative_generate


@pytest.fixture(scope="module")
def loaded_models():
    """Models shared by the evaluations in this module, keyed like `run_evaluation` keys them."""
    return {
        (QWEN_DRAFT_ID, "float32"): load_model(QWEN_DRAFT_ID),
        (SMOLLM_ID, "float32"): load_model(SMOLLM_ID),
    }


def _settings(tmp_path, **overrides):
    options = dict(target=QWEN_DRAFT_ID, draft=SMOLLM_ID, benchmark="spec-bench", out=tmp_path / "eval" / "smollm.jsonl",
                   num_assistant_tokens=3, max_questions=2, max_new_tokens=8)
    options.update(overrides)
    return EvalSettings(**options)


def test_eval_settings_rejects_unknown_benchmark(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'spec_bench'; choose one of spec-bench"):
        _settings(tmp_path, benchmark="spec_bench")


def test_eval_settings_rejects_k_below_one(tmp_path):
    with pytest.raises(ValueError, match=r"`num_assistant_tokens` \(K\) must be an integer >= 1, got 0"):
        _settings(tmp_path, num_assistant_tokens=0)


def test_eval_cli_reports_unknown_benchmark(tmp_path, capsys):
    status = main(["eval", "--target", QWEN_DRAFT_ID, "--draft", SMOLLM_ID, "--benchmark", "nope",
                   "--out", str(tmp_path / "x.jsonl")])
    assert status == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_run_evaluation_resumes_after_interruption(tmp_path, loaded_models, monkeypatch):
    settings = _settings(tmp_path)
    real_answer = evaluate._speculative_answer
    calls = []

    def interrupted(question, *args, **kwargs):
        calls.append(question["id"])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_answer(question, *args, **kwargs)

    monkeypatch.setattr(evaluate, "_speculative_answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(settings, loaded_models)
    assert len(read_answers(settings.out)) == 1

    calls.clear()
    summary = run_evaluation(settings, loaded_models)
    answers = read_answers(settings.out)
    assert len(calls) == 1
    assert len(answers) == 2
    assert summary["num_questions"] == 2
    assert summary["greedy_mismatches"] == 0
    assert summary["greedy_outputs_compared"] == 2
    assert summary["mal"] >= 1.0
    assert summary["improvement_factor"] > 0
    assert json.loads(settings.summary_file().read_text())["mal"] == summary["mal"]

    first = next(iter(answers.values()))
    choice = first["choices"][0]
    # The first Spec-Bench questions are MT-Bench ones with two turns.
    assert len(choice["turns"]) == 2
    assert len(choice["accept_lengths"]) == 2
    assert sum(choice["accept_lengths"][0]) == choice["new_tokens"][0]
    assert first["category_group"] == "mt_bench"


def test_run_evaluation_rejects_other_settings(tmp_path, loaded_models):
    settings = _settings(tmp_path, max_questions=1, max_new_tokens=4)
    run_evaluation(settings, loaded_models)
    with pytest.raises(ValueError, match="contains answers from other settings .*num_assistant_tokens: file has 3, requested 2"):
        run_evaluation(_settings(tmp_path, max_questions=1, max_new_tokens=4, num_assistant_tokens=2), loaded_models)


def test_rebuilt_draft_is_evaluated_again(tmp_path, loaded_models):
    model, tokenizer = loaded_models[(SMOLLM_ID, "float32")]
    draft_dir = tmp_path / "draft"
    model.save_pretrained(draft_dir)
    tokenizer.save_pretrained(draft_dir)
    settings = _settings(tmp_path, draft=str(draft_dir), max_questions=1, max_new_tokens=4)
    run_evaluation(settings, loaded_models)
    first_build = read_answers(settings.out)

    # Rebuild the draft in place, as a rerun of the pruning or fine-tuning stage does.
    rebuilt = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    with torch.no_grad():
        rebuilt.model.layers[0].mlp.down_proj.weight[0].zero_()
    rebuilt.save_pretrained(draft_dir)
    loaded_models.pop((str(draft_dir), "float32"))
    rerun = _settings(tmp_path, draft=str(draft_dir), max_questions=1, max_new_tokens=4)
    assert rerun.draft_weights != settings.draft_weights
    run_evaluation(rerun, loaded_models)

    set_aside = settings.out.with_name(f"{settings.out.stem}.draft-{settings.draft_weights}.jsonl")
    assert read_answers(set_aside) == first_build
    answers = read_answers(rerun.out)
    assert [a["run"]["draft_weights"] for a in answers.values()] == [rerun.draft_weights]


def test_cross_check_transformers_same_output_and_mal(loaded_models):
    target, tokenizer = loaded_models[(QWEN_DRAFT_ID, "float32")]
    draft = AutoModelForCausalLM.from_pretrained(resolve(QWEN_DRAFT_ID), num_hidden_layers=6, dtype=torch.float32).eval()
    prompts = ["What is 17 times 23? Show the steps."]
    ours_tokens = ours_passes = theirs_tokens = theirs_passes = 0
    for text in prompts:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ours = speculative_generate(target, draft, ids, num_assistant_tokens=3, max_new_tokens=20)
        theirs = transformers_assisted_generate(target, draft, ids, 3, 20)
        assert ours.new_token_ids == theirs["new_token_ids"]
        ours_tokens += ours.num_new_tokens
        ours_passes += len(ours.rounds)
        theirs_tokens += len(theirs["new_token_ids"])
        theirs_passes += theirs["target_forward_passes"]
    assert ours_tokens / ours_passes == pytest.approx(theirs_tokens / theirs_passes, rel=0.02)
