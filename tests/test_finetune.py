"""Tests for `sd2_utils.finetune`: assistant-only labels, the fixed mask, resume, two processes.

The drafts are SmolLM2-135M-Instruct pruned by magnitude (50% unstructured and 2:4) through
`sd2_utils.prune`; the data are real GSM8K training conversations written in the distilled
record format (the original answers stand in for the target's, which only changes who wrote
the text). Runs are a few steps on sequences of at most 128 tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd2_utils import finetune, prune
from sd2_utils.finetune import IGNORE_INDEX, FinetuneConfig

SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
QWEN_DRAFT_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
GEMMA_ID = "google/gemma-3-270m"
NUM_CONVERSATIONS = 24
MAX_SEQ_LENGTH = 128
TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "Doubled, it is 10."},
]


def write_distilled_folder(directory: Path, rows: list[dict]) -> Path:
    """Write rows in the distilled folder format that `sd2_utils.distill.load_distilled` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    records = [{**row, "kept": True} for row in rows]
    (directory / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = {"format_version": 1, "shards": {"shard-00000.jsonl": {"ids": [r["id"] for r in records]}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    from sd2_utils.data import load_gsm8k

    rows = load_gsm8k("train").select(range(NUM_CONVERSATIONS)).to_list()
    return write_distilled_folder(tmp_path_factory.mktemp("distilled") / "gsm8k", rows)


@pytest.fixture(scope="module")
def sparse_drafts(tmp_path_factory) -> dict[str, Path]:
    """SmolLM2-135M pruned by magnitude: 50% unstructured and 2:4."""
    root = tmp_path_factory.mktemp("drafts")
    drafts = {"unstructured": root / "smollm2-magnitude50", "2:4": root / "smollm2-magnitude2of4"}
    prune.prune_draft(SMOLLM_ID, drafts["unstructured"], method="magnitude", sparsity=0.5, calibration=None)
    prune.prune_draft(SMOLLM_ID, drafts["2:4"], method="magnitude", sparsity=None, pattern="2:4",
                      calibration=None)
    return drafts


def small_config(model, data, out, **overrides) -> FinetuneConfig:
    settings = dict(model=str(model), data=[str(data)], out=str(out), max_steps=4, batch_size=2,
                    max_seq_length=MAX_SEQ_LENGTH, learning_rate=1e-4, warmup=1, save_steps=2, seed=0)
    settings.update(overrides)
    return FinetuneConfig(**settings)


# ---------------------------------------------------------------------------------------------
# Labels from the chat template


@pytest.mark.parametrize("model_id", [SMOLLM_ID, QWEN_DRAFT_ID])
def test_tokenize_conversation_labels_assistant_turns(model_id):
    from sd2_utils.models import load_tokenizer

    tokenizer = load_tokenizer(model_id)
    row = finetune.tokenize_conversation(tokenizer, TURNS, max_seq_length=4096)
    labelled = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    unlabelled = [token for token, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]

    # Both responses, each closed by the template's end-of-turn token and newline.
    assert tokenizer.decode(labelled) == "2 + 3 = 5.<|im_end|>\nDoubled, it is 10.<|im_end|>\n"
    assert "What is 2 + 3?" in tokenizer.decode(unlabelled)
    assert tokenizer.decode(unlabelled).endswith("<|im_start|>assistant\n")
    assert [label for label in row["labels"] if label != IGNORE_INDEX] == labelled


def test_tokenize_conversation_base_model_without_template():
    from sd2_utils.models import load_tokenizer

    tokenizer = load_tokenizer(GEMMA_ID)
    assert not tokenizer.chat_template
    row = finetune.tokenize_conversation(tokenizer, TURNS, max_seq_length=4096)
    labelled = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]

    assert tokenizer.decode(labelled) == "2 + 3 = 5.Doubled, it is 10."


def test_tokenize_conversation_truncates_to_max_seq_length():
    from sd2_utils.models import load_tokenizer

    tokenizer = load_tokenizer(SMOLLM_ID)
    row = finetune.tokenize_conversation(tokenizer, TURNS, max_seq_length=40)

    assert len(row["input_ids"]) == 40
    assert len(row["labels"]) == 40


def test_supervised_collator_pads_with_ignored_labels():
    collate = finetune.SupervisedCollator(pad_token_id=7)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])

    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Input errors


def test_load_training_conversations_folder_without_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="contains no distilled records \\(no manifest.json\\)"):
        finetune.load_training_conversations([tmp_path])


def test_load_training_conversations_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder .*missing.* not found"):
        finetune.load_training_conversations([tmp_path / "missing"])


def test_load_training_conversations_no_kept_records(tmp_path):
    folder = write_distilled_folder(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="contains no distilled records to train on"):
        finetune.load_training_conversations([folder])


def test_load_draft_masks_manifest_mismatch(sparse_drafts, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "mismatch"
    shutil.copytree(sparse_drafts["unstructured"], folder)
    manifest = json.loads((folder / prune.MANIFEST_NAME).read_text())
    layer = manifest["pruned_layers"][0]
    manifest["layers"][layer]["sparsity"] = 0.25
    (folder / prune.MANIFEST_NAME).write_text(json.dumps(manifest))
    model = AutoModelForCausalLM.from_pretrained(folder)

    with pytest.raises(ValueError, match=f"does not match its weights: layer {layer} has sparsity "
                                         f"0.500000 in its mask and 0.250000 in the manifest"):
        finetune.load_draft_masks(folder, model)


def test_load_draft_masks_nonzero_pruned_weight(sparse_drafts, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sparse_drafts["2:4"])
    masks = prune.load_masks(sparse_drafts["2:4"])
    layer = next(iter(masks))
    weight = dict(model.named_modules())[layer].weight
    with torch.no_grad():
        weight[~masks[layer]] = 0.01  # Every pruned weight of one layer becomes nonzero.

    with pytest.raises(ValueError, match=f"layer {layer} has {int((~masks[layer]).sum())} nonzero "
                                         f"weights at pruned positions"):
        finetune.load_draft_masks(sparse_drafts["2:4"], model)


def test_finetune_rejects_checkpoints_without_resume(distilled, tmp_path):
    out = tmp_path / "out"
    (out / finetune.CHECKPOINTS_DIR).mkdir(parents=True)
    config = small_config(SMOLLM_ID, distilled, out)
    fingerprint = finetune._settings_fingerprint({"settings": config.settings(),
                                                  "versions": prune.library_versions()})
    (out / finetune.CHECKPOINTS_DIR / finetune.SETTINGS_NAME).write_text(
        json.dumps({"fingerprint": fingerprint, "settings": config.settings()}))

    with pytest.raises(ValueError, match="contains checkpoints of an earlier run; pass --resume"):
        finetune.finetune(config)
    other = small_config(SMOLLM_ID, distilled, out, learning_rate=1e-3, resume=True)
    with pytest.raises(ValueError, match="written with other settings \\(learning_rate differ\\)"):
        finetune.finetune(other)


# ---------------------------------------------------------------------------------------------
# The fixed mask


@pytest.fixture(scope="module")
def unstructured_run(sparse_drafts, distilled, tmp_path_factory):
    """An uninterrupted 6-step run on the 50% draft with 4 held-out conversations."""
    out = tmp_path_factory.mktemp("unstructured") / "out"
    config = small_config(sparse_drafts["unstructured"], distilled, out, max_steps=6, num_heldout=4)
    return config, finetune.finetune(config)


def check_mask_kept(draft: Path, out: Path, summary: dict) -> None:
    from transformers import AutoModelForCausalLM

    masks = prune.load_masks(draft)
    before = AutoModelForCausalLM.from_pretrained(draft)
    after = AutoModelForCausalLM.from_pretrained(out)
    modules_before = dict(before.named_modules())
    modules_after = dict(after.named_modules())
    changed = 0
    for name, mask in masks.items():
        weight_before = modules_before[name].weight.detach()
        weight_after = modules_after[name].weight.detach()
        # The zeros are the same positions, and they include every pruned one.
        assert torch.equal(weight_after != 0, weight_before != 0), name
        assert not bool((weight_after != 0)[~mask].any()), name
        changed += int((weight_after != weight_before).sum())
    assert changed > 0  # training moved the kept weights
    assert summary["sparsity_after"] == summary["sparsity_before"]
    assert summary["mask_violations"] == 0
    # The fixed mask is every nonzero weight of the input draft.
    fixed = prune.compute_masks(before, prune.load_sparsity_manifest(draft))
    assert summary["masks_fingerprint"] == finetune.masks_fingerprint(fixed)
    manifest = prune.load_sparsity_manifest(out)
    original = prune.load_sparsity_manifest(draft)
    assert manifest["layers"] == original["layers"]
    assert manifest["finetune"]["weight_sparsity"] == summary["sparsity_after"]
    assert manifest["finetune"]["steps"] == summary["steps"]
    assert manifest["finetune"]["mask_violations"] == 0
    assert torch.equal(prune.load_masks(out)[next(iter(masks))], masks[next(iter(masks))])


def test_finetune_unstructured_mask_kept(sparse_drafts, unstructured_run):
    config, summary = unstructured_run
    check_mask_kept(sparse_drafts["unstructured"], Path(config.out), summary)
    assert summary["steps"] == 6
    assert all(value == pytest.approx(0.5, abs=1e-4) for value in summary["sparsity_after"].values())


def test_finetune_two_of_four_mask_kept(sparse_drafts, distilled, tmp_path):
    from sd2_utils.sparsity import verify_pattern
    from transformers import AutoModelForCausalLM

    config = small_config(sparse_drafts["2:4"], distilled, tmp_path / "out", max_steps=2,
                          freeze_embeddings=True, gradient_checkpointing=True, bf16=True)
    summary = finetune.finetune(config)

    check_mask_kept(sparse_drafts["2:4"], tmp_path / "out", summary)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name in prune.load_masks(sparse_drafts["2:4"]):
        assert verify_pattern(dict(model.named_modules())[name].weight.detach(), (2, 4)), name
    # Frozen embeddings (tied to lm_head in SmolLM2) are unchanged.
    original = AutoModelForCausalLM.from_pretrained(sparse_drafts["2:4"])
    assert torch.equal(model.get_input_embeddings().weight, original.get_input_embeddings().weight)


def test_finetune_loss_decreases(unstructured_run):
    config, summary = unstructured_run
    log = finetune.read_training_log(config.out)

    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]
    assert summary["heldout_perplexity_after"] < 0.8 * summary["heldout_perplexity_before"]
    first, last = log[0]["loss"], sum(entry["loss"] for entry in log[-2:]) / 2
    assert last < first


def test_finetune_output_loads_and_is_reused(unstructured_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, summary = unstructured_run
    model = AutoModelForCausalLM.from_pretrained(config.out)
    tokenizer = AutoTokenizer.from_pretrained(config.out)

    assert model.config.model_type == "llama"
    assert tokenizer.chat_template
    assert not (Path(config.out) / finetune.CHECKPOINTS_DIR).exists()
    assert finetune.recorded_settings(config.out) == config.settings()
    assert finetune.finetune(config) == summary  # a finished folder is reused


# ---------------------------------------------------------------------------------------------
# Resume and several processes


def _command(config: FinetuneConfig) -> list[str]:
    return [sys.executable, "-m", "sd2_utils.finetune", "--model", config.model, "--data", config.data[0],
            "--out", config.out, "--max-steps", str(config.max_steps), "--batch-size", str(config.batch_size),
            "--max-seq-length", str(config.max_seq_length), "--learning-rate", str(config.learning_rate),
            "--warmup", str(config.warmup), "--save-steps", str(config.save_steps),
            "--num-heldout", str(config.num_heldout), "--seed", str(config.seed)]


def test_finetune_resume_after_kill(sparse_drafts, distilled, unstructured_run, tmp_path):
    reference_config, reference = unstructured_run
    out = tmp_path / "out"
    config = FinetuneConfig(**{**vars(reference_config), "out": str(out)})
    checkpoint = out / finetune.CHECKPOINTS_DIR / "checkpoint-2" / "trainer_state.json"
    process = subprocess.Popen(_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.is_file()
    assert not (out / finetune.SUMMARY_NAME).exists()  # killed before the run finished

    resumed = finetune.finetune(FinetuneConfig(**{**vars(config), "resume": True}))

    assert resumed["steps"] == 6
    assert resumed["masks_fingerprint"] == reference["masks_fingerprint"]
    assert resumed["mask_violations"] == 0
    # The same data order and optimizer state: the same loss at every step as without the kill.
    log = finetune.read_training_log(out)
    reference_log = finetune.read_training_log(reference_config.out)
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]
    for entry, expected in zip(log, reference_log):
        assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-4), entry["step"]


def test_finetune_two_processes_gloo(sparse_drafts, distilled, tmp_path):
    out = tmp_path / "out"
    config = small_config(sparse_drafts["2:4"], distilled, out, max_steps=2, batch_size=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29561", *(_command(config)[1:]), "--threads", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})

    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((out / finetune.SUMMARY_NAME).read_text())
    assert summary["steps"] == 2
    assert summary["mask_violations"] == 0
    assert "world_size=2" in completed.stderr or "world size 2" in completed.stderr
    check_mask_kept(sparse_drafts["2:4"], out, summary)


def _run_fsdp2_worker(draft: Path, out: Path, mode: str, port: int) -> list[dict]:
    out.mkdir()
    worker = Path(__file__).with_name("fsdp2_mask_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port), str(worker), str(draft), str(out), mode]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def test_fixed_mask_holds_on_fsdp2_shards(sparse_drafts, tmp_path):
    results = _run_fsdp2_worker(sparse_drafts["2:4"], tmp_path / "masked", "masked", 29562)

    for result in results:
        assert result["world_size"] == 2
        # Each process stores half the rows of every weight, as a DTensor shard.
        assert result["parameter_type"] == "DTensor"
        assert result["sharded_by_rows"] == [True]
        assert result["local_rows"] * 2 == result["full_rows"]
        assert result["violations"] == 0
        assert result["changed"] > 0
    assert results[0]["losses"] == results[1]["losses"]


def test_fsdp2_shards_lose_mask_without_callback(sparse_drafts, tmp_path):
    # The control for the test above: without the callback, AdamW moves pruned weights.
    results = _run_fsdp2_worker(sparse_drafts["2:4"], tmp_path / "unmasked", "unmasked", 29563)

    for result in results:
        assert result["parameter_type"] == "DTensor"
        assert result["violations"] > 0
