"""Sparse fine-tuning with a fixed mask: a draft learns the target's distilled responses.

SD² (Lasby et al. 2025, arXiv 2504.08838) fine-tunes a pruned draft on self-distilled data
while its sparsity mask stays fixed. Every weight that pruning set to zero is still exactly
zero after every optimizer step, so the draft keeps its sparsity (and its MACs) while it
recovers the accuracy that pruning cost. Dense and layer-pruned drafts train the same way,
without a mask.

How the mask is held:

- a draft with ``sparsity_manifest.json`` (``sd2_utils.prune``) is sparse. Its mask keeps
  every weight of the pruned layers that is nonzero at the start, and pruning's own masks
  (``sparsity_masks.safetensors``) are checked against the weights on load;
- gradients of pruned weights are zeroed as they are computed, by a tensor hook, so gradient
  clipping uses the masked norm. They are zeroed again just before the optimizer step, which
  covers wrappers such as FSDP2 that assign gradients to sharded parameters;
- the weights are re-masked right after each optimizer step, so no optimizer state (momentum,
  weight decay) can move a pruned weight away from zero.

Training runs on the Hugging Face ``Trainer``, so ``accelerate launch`` with DDP, FSDP2 or
DeepSpeed ZeRO-1/2 runs the same code (configs in ``configs/accelerate/``)::

    accelerate launch --config_file configs/accelerate/fsdp.yaml -m sd2_utils.finetune \\
        --model DRAFT_DIR --data DISTILL_DIR --out OUT_DIR --max-steps 1000

Several CPU processes (DDP over gloo, as the tests run it) start with torchrun::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m sd2_utils.finetune --threads 1 ...

With accelerate 1.16 and no MPI installed, ``accelerate launch --cpu --num_processes 2``
started only one process (world size 1), so use torchrun on CPU. accelerate enables FSDP only
on GPUs; the tests check the mask on FSDP2 shards with torch's ``fully_shard`` over gloo.

Each distilled conversation is rendered with the draft's own chat template and tokenized with
the draft's tokenizer (the text is re-tokenized, so a draft from another family, such as
SmolLM2 for a Qwen target, trains the same way); the loss covers only the assistant tokens.

Output folder (``--out``):

- the model in the Hugging Face layout (``from_pretrained`` loads it) with its tokenizer;
- for a sparse draft, ``sparsity_masks.safetensors`` (unchanged) and
  ``sparsity_manifest.json`` with a ``finetune`` entry that records the per-layer sparsity
  measured on the saved weights and the mask fingerprint;
- ``training_log.json``: loss, learning rate and gradient norm per step;
- ``finetune_summary.json``: settings, token counts, throughput, held-out perplexity before and
  after, and the mask check; written last, so a folder with it is a finished run;
- ``checkpoints/``: ``Trainer`` checkpoints every ``save_steps``; ``--resume`` continues from
  the last complete one with the same mask and the same data order. Removed after a finished
  run unless ``keep_checkpoints`` is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapter
from .io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

SUMMARY_NAME = "finetune_summary.json"
TRAINING_LOG_NAME = "training_log.json"
CHECKPOINTS_DIR = "checkpoints"
# Settings of the run that wrote the checkpoints; a resume with other settings is rejected.
SETTINGS_NAME = "finetune_settings.json"
# Label of tokens that carry no loss (the default `ignore_index` of torch's cross-entropy).
IGNORE_INDEX = -100
# Settings that may differ between an interrupted run and its resume.
_RESUME_FREE_FIELDS = ("resume", "overwrite", "keep_checkpoints", "save_steps")


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the `sd2 finetune` options).

    Defaults marked "chosen" are this project's choice, not values from the SD² paper.
    """

    model: str
    data: Sequence[str]
    out: str
    max_steps: int | None = None
    # Used when `max_steps` is None.
    epochs: float = 1.0
    learning_rate: float = 2e-5  # chosen
    # Conversations per optimizer step and process: batch_size * gradient_accumulation_steps.
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 1024
    # Warm-up length: a fraction of the total steps when below 1, else a step count.
    warmup: float = 0.1  # chosen
    lr_scheduler: str = "cosine"  # chosen
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Any `transformers` optimizer name; `adafactor` keeps no first moment and factors the
    # second, so it needs far less memory than `adamw_torch`.
    optim: str = "adamw_torch"
    freeze_embeddings: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    # Conversations read from the data folders (None: all), in folder order.
    num_samples: int | None = None
    # Conversations kept out of training, taken from the end, for held-out perplexity.
    num_heldout: int = 0
    save_steps: int = 50
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]
        self.data = [str(path) for path in self.data]
        self.model = str(self.model)
        self.out = str(self.out)
        # The CLI passes floats; equal settings must give equal fingerprints (1 and 1.0 differ in JSON).
        for name in ("epochs", "learning_rate", "warmup", "weight_decay", "max_grad_norm"):
            setattr(self, name, float(getattr(self, name)))
        checks = (
            ("max_steps", self.max_steps is None or self.max_steps > 0, "a positive step count"),
            ("epochs", self.epochs > 0, "a positive number of epochs"),
            ("learning_rate", self.learning_rate > 0, "a positive number such as 2e-5"),
            ("batch_size", self.batch_size > 0, "a positive number of conversations"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps > 0, "a positive integer"),
            ("max_seq_length", self.max_seq_length >= 8, "at least 8 tokens"),
            ("warmup", self.warmup >= 0, "a fraction in [0, 1) or a step count"),
            ("num_heldout", self.num_heldout >= 0, "zero or more conversations"),
            ("save_steps", self.save_steps > 0, "a positive step count"),
        )
        for name, valid, allowed in checks:
            if not valid:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: use {allowed}")
        if not self.data:
            raise ValueError("invalid data=[]: pass at least one distilled folder")

    def settings(self) -> dict[str, Any]:
        """Return the settings that define the result (the resume and output options excluded)."""
        values = dataclasses.asdict(self)
        return {key: value for key, value in values.items() if key not in _RESUME_FREE_FIELDS}


# ---------------------------------------------------------------------------------------------
# Data: distilled conversations, rendered and tokenized with assistant-only labels


def load_training_conversations(data: Sequence[str | os.PathLike]) -> list[list[dict]]:
    """Load the kept conversations of one or more distilled folders, in folder order.

    Args:
        data: folders written by ``sd2 distill`` (``sd2_utils.distill.load_distilled``).

    Returns:
        conversations, each a list of ``{"role", "content"}`` turns with at least one
        assistant turn.

    Raises:
        FileNotFoundError: a folder does not exist or has no distillation manifest.
        ValueError: a folder contains no kept distilled records with assistant turns.
    """
    from .distill import MANIFEST_NAME, load_distilled

    conversations: list[list[dict]] = []
    for directory in data:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"data folder {str(directory)!r} not found; pass the --out folder of `sd2 distill`"
            )
        if not (directory / MANIFEST_NAME).is_file():
            raise FileNotFoundError(
                f"data folder {str(directory)!r} contains no distilled records (no {MANIFEST_NAME}); "
                f"pass the --out folder of `sd2 distill`, or run `sd2 distill --out {directory}`"
            )
        try:
            rows = load_distilled(directory)
        except ValueError as error:
            raise ValueError(
                f"data folder {str(directory)!r} contains no distilled records to train on ({error}); "
                f"run `sd2 distill` to completion or pass another folder"
            ) from None
        found = [list(row["turns"]) for row in rows
                 if any(turn["role"] == "assistant" for turn in row["turns"])]
        if not found:
            raise ValueError(
                f"data folder {str(directory)!r} contains no distilled records with assistant turns; "
                f"run `sd2 distill` to completion or pass another folder"
            )
        logger.info("Read %d distilled conversations from %s", len(found), directory)
        conversations.extend(found)
    return conversations


def render_with_assistant_spans(tokenizer, turns: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation in the draft's input format and locate each assistant response in the text.

    With a chat template, the span of assistant turn ``i`` runs from the end of the prompt that
    requests it (turns before ``i`` plus the generation prompt) to the end of the conversation
    rendered up to turn ``i``, so it covers the response and the template's end-of-turn token
    (``<|im_end|>`` in Qwen2.5 and SmolLM2), which teaches the draft where to stop. Without a
    chat template (a base model), turns are joined by blank lines and each span covers the
    response's content only.

    Returns:
        (text, spans): spans are ``(start, end)`` character offsets into `text`.

    Raises:
        ValueError: the template renders an earlier part of the conversation differently from
            the whole (templates that rewrite earlier turns), so the spans cannot be found.
    """
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in turns]
    if not getattr(tokenizer, "chat_template", None):
        pieces, spans, position = [], [], 0
        for index, turn in enumerate(turns):
            if index:
                pieces.append("\n\n")
                position += 2
            if turn["role"] == "assistant":
                spans.append((position, position + len(turn["content"])))
            pieces.append(turn["content"])
            position += len(turn["content"])
        return "".join(pieces), spans

    text = tokenizer.apply_chat_template(turns, tokenize=False)
    spans = []
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(turns[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(turns[: index + 1], tokenize=False)
        if not (text.startswith(prompt) and text.startswith(through) and len(prompt) <= len(through)):
            raise ValueError(
                f"the chat template of {type(tokenizer).__name__} renders the first {index + 1} "
                f"turns differently from the whole conversation, so the assistant tokens cannot "
                f"be located; use a draft whose template only appends turns"
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, turns: Sequence[dict], max_seq_length: int) -> dict[str, list[int]]:
    """Tokenize one conversation with labels on the assistant tokens only.

    A token is an assistant token when its first character lies inside an assistant span of
    `render_with_assistant_spans`. The sequence is cut to `max_seq_length` tokens.

    Returns:
        ``{"input_ids": [seq_len], "labels": [seq_len]}``, labels equal to the input ids on
        assistant tokens and ``IGNORE_INDEX`` elsewhere (the model shifts them itself).
    """
    text, spans = render_with_assistant_spans(tokenizer, turns)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:max_seq_length]
    offsets = encoded["offset_mapping"][:max_seq_length]
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (start, _end) in enumerate(offsets):
        if any(span_start <= start < span_end for span_start, span_end in spans):
            labels[position] = input_ids[position]
    return {"input_ids": input_ids, "labels": labels}


def build_training_dataset(conversations: Sequence[Sequence[dict]], tokenizer, max_seq_length: int):
    """Tokenize conversations into a ``datasets.Dataset`` with ``input_ids`` and ``labels``.

    Conversations whose assistant tokens all fall beyond `max_seq_length` are dropped (logged).
    """
    import datasets

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; assistant-only labels "
            f"need character offsets, which only fast tokenizers return"
        )
    rows, dropped = [], 0
    for turns in conversations:
        row = tokenize_conversation(tokenizer, turns, max_seq_length)
        if all(label == IGNORE_INDEX for label in row["labels"]):
            dropped += 1
            continue
        rows.append(row)
    if dropped:
        logger.warning("Dropped %d of %d conversations with no assistant token within "
                       "max_seq_length=%d", dropped, len(conversations), max_seq_length)
    if not rows:
        raise ValueError(
            f"no conversation has assistant tokens within max_seq_length={max_seq_length}; "
            f"raise --max-seq-length"
        )
    return datasets.Dataset.from_list(rows)


class SupervisedCollator:
    """Pad a batch of tokenized conversations on the right.

    Returns tensors ``input_ids``, ``attention_mask`` and ``labels``, each
    ``[batch, longest_seq_len]``; padded positions get label ``IGNORE_INDEX``.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, :length] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[index, :length] = torch.tensor(row["labels"], dtype=torch.long)
            attention_mask[index, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """Return the tokenizer's pad token id, or its end-of-sequence id when it has no pad token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")


@torch.no_grad()
def assistant_perplexity(model: nn.Module, dataset, batch_size: int = 4) -> float:
    """Return the perplexity of `model` on the assistant tokens of tokenized conversations.

    Args:
        dataset: rows with ``input_ids`` and ``labels`` (`build_training_dataset`).

    Returns:
        ``exp(total next-token loss / number of assistant tokens predicted)``.
    """
    collate = SupervisedCollator(pad_token_id=0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    rows = list(dataset)
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        targets = batch["labels"][:, 1:].to(device)  # [batch, seq_len - 1]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total_loss += float(loss)
        total_tokens += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("assistant perplexity needs at least one assistant token; got none")
    return math.exp(total_loss / total_tokens)


# ---------------------------------------------------------------------------------------------
# The fixed mask


def load_draft_masks(model_dir: str | os.PathLike, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """Build the fixed mask of a sparse draft and check its manifest against its weights.

    The mask keeps every weight that is nonzero now (``prune.compute_masks``): every zero of a
    pruned layer stays zero through fine-tuning. That is a superset of the zeros pruning chose
    (``sparsity_masks.safetensors``), because a kept weight may already have been exactly zero.

    Args:
        model_dir: the draft's folder; a folder without ``sparsity_manifest.json`` is a dense
            or layer-pruned draft and trains without a mask.
        model: the draft loaded from that folder.

    Returns:
        (masks, manifest): ``{module_name: bool [rows, columns]}``, True where a weight may
        train, or (None, None) for a draft without a manifest.

    Raises:
        ValueError: the manifest does not match the weights: a pruned layer is missing, a
            shape differs, a position that pruning chose has a nonzero weight, or the
            sparsity of a layer's pruning mask differs from the manifest's.
    """
    from .prune import MANIFEST_NAME, MASKS_NAME, compute_masks, load_masks, load_sparsity_manifest

    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST_NAME).is_file():
        return None, None
    manifest = load_sparsity_manifest(model_dir)
    if not (model_dir / MASKS_NAME).is_file():
        raise ValueError(
            f"model directory {str(model_dir)!r} has {MANIFEST_NAME} but no {MASKS_NAME}; "
            f"prune the draft again with `sd2 prune`"
        )
    mismatch = f"the sparsity manifest of {str(model_dir)!r} does not match its weights"
    fix = (f"prune the draft again with `sd2 prune`, or remove {MANIFEST_NAME} to train it as a "
           f"dense draft")
    pruning_masks = load_masks(model_dir)
    try:
        masks = compute_masks(model, manifest)
    except ValueError as error:
        raise ValueError(f"{mismatch}: {error}") from None
    extra_zeros = 0
    for name, pruning_mask in pruning_masks.items():
        mask = masks[name]
        recorded = manifest["layers"][name]
        if tuple(pruning_mask.shape) != tuple(mask.shape) or list(mask.shape) != list(recorded["shape"]):
            raise ValueError(
                f"{mismatch}: layer {name} has weight shape {list(mask.shape)}, mask shape "
                f"{list(pruning_mask.shape)} and manifest shape {recorded['shape']}; {fix}"
            )
        nonzero_pruned = int((mask & ~pruning_mask).sum())
        if nonzero_pruned:
            raise ValueError(
                f"{mismatch}: layer {name} has {nonzero_pruned} nonzero weights at pruned "
                f"positions; {fix}"
            )
        mask_sparsity = 1.0 - float(pruning_mask.float().mean())
        if abs(mask_sparsity - recorded["sparsity"]) > 1.0 / mask.numel() + 1e-9:
            raise ValueError(
                f"{mismatch}: layer {name} has sparsity {mask_sparsity:.6f} in its mask and "
                f"{recorded['sparsity']:.6f} in the manifest; {fix}"
            )
        extra_zeros += int((~mask & pruning_mask).sum())
    logger.info("Fixed mask of %d layers from %s: overall sparsity %.4f, plus %d kept weights "
                "that are already zero", len(masks), model_dir, manifest["overall_sparsity"], extra_zeros)
    return masks, manifest


def masks_fingerprint(masks: dict[str, torch.Tensor]) -> str:
    """Return the sha256 of the masks' bits and layer names (equal masks give equal digests)."""
    from .sparse_format import pack_bits

    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(pack_bits(masks[name].cpu()).numpy().tobytes())
    return digest.hexdigest()


def layer_sparsity(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, float]:
    """Return the fraction of exactly-zero weights of linear layers, by module name.

    Args:
        names: module names (default: every ``nn.Linear`` inside the decoder layers).
    """
    modules = dict(model.named_modules())
    names = list(names) if names is not None else list(adapter.decoder_linear_layers(model))
    return {name: float((modules[name].weight.detach() == 0).float().mean()) for name in names}


def mask_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Count the nonzero weights at pruned positions, per layer (all zero when the mask held)."""
    modules = dict(model.named_modules())
    return {name: int((modules[name].weight.detach().cpu() != 0)[~mask].sum()) for name, mask in masks.items()}


def _local_like(pruned: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Place a full ``[rows, columns]`` bool tensor like `tensor`, sharding it as a DTensor does."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # torch without torch.distributed
        DTensor = None
    if DTensor is not None and isinstance(tensor, DTensor):
        return distribute_tensor(pruned.to(tensor.device), tensor.device_mesh, tensor.placements)
    return pruned.to(tensor.device)


def _shard(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _make_trainer_callback():
    from transformers import TrainerCallback

    class FixedMaskCallback(TrainerCallback):
        """Hold the pruning mask fixed through training (module docstring, "How the mask is held").

        The masks are attached to the parameters in ``on_train_begin``, after ``Trainer`` has
        wrapped or sharded the model and loaded a checkpoint, so they match the parameters that
        are trained. There the checkpoint's zeros are also checked against the masks.
        """

        def __init__(self, masks: dict[str, torch.Tensor]):
            # Stored inverted: True where the weight is pruned, for masked_fill_.
            self.pruned = {name: ~mask for name, mask in masks.items()}
            self.parameters: list[tuple[str, nn.Parameter, torch.Tensor]] = []
            self.handles: list[Any] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            modules = dict(model.named_modules())
            self.parameters = []
            for name, pruned in self.pruned.items():
                if name not in modules:
                    raise RuntimeError(
                        f"pruned layer {name} is not a module of the model being trained; "
                        f"fine-tuning with a fixed mask supports DDP, FSDP2 and DeepSpeed ZeRO-1/2, "
                        f"which keep module names"
                    )
                weight = modules[name].weight
                if hasattr(weight, "ds_id") and weight.numel() != pruned.numel():
                    raise RuntimeError(
                        "DeepSpeed ZeRO-3 partitions the weights, which the fixed mask does not "
                        "support; use ZeRO stage 1 or 2 (configs/accelerate/deepspeed.yaml) or FSDP2"
                    )
                local = _local_like(pruned, weight)
                self.parameters.append((name, weight, local))
            with torch.no_grad():
                # Each process checks its own shard; an unsharded tensor is its own shard.
                violations = {name: int(((_shard(weight) != 0) & _shard(local)).sum())
                              for name, weight, local in self.parameters}
            bad = {name: count for name, count in violations.items() if count}
            if bad:
                name, count = next(iter(bad.items()))
                raise RuntimeError(
                    f"the weights at the start of training have {sum(bad.values())} nonzero weights "
                    f"at pruned positions ({count} in {name}); the checkpoint does not belong to this "
                    f"sparse draft: pass --overwrite to start again"
                )
            for _name, weight, local in self.parameters:
                # Sharded (DTensor) parameters get their gradients assigned after the
                # reduce-scatter, so a tensor hook would not run: on_pre_optimizer_step masks them.
                if weight.requires_grad and not hasattr(weight, "to_local"):
                    self.handles.append(weight.register_hook(
                        lambda grad, local=local: grad.masked_fill(local, 0.0)))
            logger.info("Holding the mask of %d layers fixed", len(self.parameters))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for _name, weight, local in self.parameters:
                if weight.grad is not None:
                    weight.grad.masked_fill_(local, 0.0)

        @torch.no_grad()
        def on_optimizer_step(self, args, state, control, **kwargs):
            for _name, weight, local in self.parameters:
                weight.masked_fill_(local, 0.0)

        def on_train_end(self, args, state, control, **kwargs):
            for handle in self.handles:
                handle.remove()
            self.handles = []

    return FixedMaskCallback


def freeze_embeddings(model: nn.Module) -> int:
    """Stop gradients to the input embeddings and ``lm_head`` (tied or not); return the count
    of frozen parameters."""
    frozen = 0
    modules = [adapter.input_embeddings(model), adapter.lm_head(model)]
    seen = set()
    for module in modules:
        if module is None:
            continue
        for parameter in module.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume


def _settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def last_complete_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """Return the checkpoint folder with the highest step that ``Trainer`` finished writing.

    ``Trainer`` writes ``trainer_state.json`` after the weights, optimizer and RNG states, so a
    folder without it was cut short by a kill and is skipped.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return None
    candidates = []
    for path in checkpoints_dir.glob("checkpoint-*"):
        step = path.name.rpartition("-")[2]
        if step.isdigit() and (path / "trainer_state.json").is_file():
            candidates.append((int(step), path))
    return max(candidates)[1] if candidates else None


def _prepare_output(config: FinetuneConfig, out: Path, fingerprint: str) -> Path | None:
    """Check the output folder against the settings; return the checkpoint to resume from."""
    checkpoints = out / CHECKPOINTS_DIR
    # Under torchrun or accelerate every process gets here; only the first one deletes.
    if config.overwrite and out.exists() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(out)
    recorded = read_json(checkpoints / SETTINGS_NAME)
    if recorded is None:
        return None
    if not config.resume:
        raise ValueError(
            f"output folder {str(out)!r} contains checkpoints of an earlier run; pass --resume to "
            f"continue it, or --overwrite to start again"
        )
    if recorded["fingerprint"] != fingerprint:
        changed = sorted(key for key, value in config.settings().items()
                         if recorded["settings"].get(key) != value)
        raise ValueError(
            f"cannot resume in {str(out)!r}: the checkpoints were written with other settings "
            f"({', '.join(changed) or 'library versions'} differ); rerun with the same settings, or "
            f"pass --overwrite to start again"
        )
    checkpoint = last_complete_checkpoint(checkpoints)
    if checkpoint is None:
        logger.warning("No complete checkpoint in %s; starting from the first step", checkpoints)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# The stage


def _training_arguments(config: FinetuneConfig, checkpoints: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        bf16=config.bf16,
        # Without a GPU, `use_cpu` makes accelerate use CPU bf16 autocast and, under torchrun,
        # a gloo process group.
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        # Two, so that a kill while the newest one is written still leaves a complete one.
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def finetune(config: FinetuneConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fine-tune a draft on distilled conversations with its mask fixed; return the summary.

    A finished output folder with the same settings is reused. Under ``accelerate launch`` or
    ``torchrun`` every process calls this function; only the main process writes files other
    than checkpoints.

    Args:
        config: the run's settings.
        callbacks: extra ``transformers.TrainerCallback`` objects (timing, logging).

    Returns:
        the contents of ``finetune_summary.json``: settings, ``train_loss`` (mean),
        ``final_loss`` (last logged step), ``steps``, ``num_input_tokens_seen``,
        ``tokens_per_second``, ``heldout_perplexity_before``/``_after`` (None without held-out
        conversations), ``sparsity_before``/``_after`` per pruned layer, ``mask_violations``
        (0 when the mask held) and ``masks_fingerprint``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from .models import resolve
    from .prune import library_versions

    out = Path(config.out)
    settings = config.settings()
    fingerprint = _settings_fingerprint({"settings": settings, "versions": library_versions()})
    finished = read_json(out / SUMMARY_NAME)
    if finished is not None and not config.overwrite:
        if finished.get("fingerprint") == fingerprint:
            logger.info("Reusing the fine-tuned draft at %s (pass overwrite to train again)", out)
            return finished
        raise ValueError(
            f"output folder {str(out)!r} contains a finished run with other settings; pass "
            f"--overwrite to replace it, or choose another --out"
        )
    resume_from = _prepare_output(config, out, fingerprint)

    started = time.perf_counter()
    # The data are checked first, so that a wrong --data fails before the model loads.
    conversations = load_training_conversations(config.data)
    source = resolve(config.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    masks, manifest = load_draft_masks(source, model)
    if config.freeze_embeddings:
        logger.info("Froze %d embedding and lm_head parameters", freeze_embeddings(model))

    if config.num_samples is not None:
        conversations = conversations[: config.num_samples]
    if config.num_heldout >= len(conversations):
        raise ValueError(
            f"invalid num_heldout={config.num_heldout}: the data contains {len(conversations)} "
            f"conversations, and at least one must remain for training"
        )
    split = len(conversations) - config.num_heldout
    train_dataset = build_training_dataset(conversations[:split], tokenizer, config.max_seq_length)
    heldout = None
    if config.num_heldout:
        try:
            heldout = build_training_dataset(conversations[split:], tokenizer, config.max_seq_length)
        except ValueError:
            logger.warning("No held-out conversation has assistant tokens within max_seq_length=%d; "
                           "held-out perplexity is not measured", config.max_seq_length)
    supervised_tokens = sum(sum(label != IGNORE_INDEX for label in row) for row in train_dataset["labels"])
    logger.info("Training %s on %d conversations (%d assistant tokens), %d held out",
                config.model, len(train_dataset), supervised_tokens, config.num_heldout)

    sparsity_before = layer_sparsity(model, list(masks)) if masks else {}
    perplexity_before = assistant_perplexity(model, heldout) if heldout is not None else None

    checkpoints = out / CHECKPOINTS_DIR
    arguments = _training_arguments(config, checkpoints)
    callbacks = [*([_make_trainer_callback()(masks)] if masks else []), *callbacks]
    trainer = Trainer(model=model, args=arguments, train_dataset=train_dataset,
                      data_collator=SupervisedCollator(pad_token_id(tokenizer)),
                      processing_class=tokenizer, callbacks=callbacks)
    if trainer.is_world_process_zero():
        atomic_write_json(checkpoints / SETTINGS_NAME, {"fingerprint": fingerprint, "settings": settings})
    logger.info("Training with world size %d", arguments.world_size)
    resumed_tokens = 0
    if resume_from is not None:
        logger.info("Resuming from %s", resume_from)
        resumed_tokens = int(read_json(resume_from / "trainer_state.json").get("num_input_tokens_seen", 0))
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.save_model(str(out))
    # Every process runs this forward pass, because a sharded (FSDP) model needs all of them.
    perplexity_after = assistant_perplexity(trainer.model, heldout) if heldout is not None else None
    trainer.accelerator.wait_for_everyone()

    summary = None
    if trainer.is_world_process_zero():
        summary = _finish(config, source, out, trainer, result, masks, manifest, sparsity_before,
                          perplexity_before, perplexity_after, fingerprint, supervised_tokens, started,
                          resumed_tokens)
    trainer.accelerator.wait_for_everyone()
    return summary if summary is not None else read_json(out / SUMMARY_NAME)


def saved_weights(directory: str | os.PathLike, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Read the ``weight`` of the named modules from a saved model's safetensors files.

    Reads one tensor at a time, so checking a saved draft costs no second copy of the model.

    Returns:
        ``{module_name: weight [rows, columns]}``.
    """
    from safetensors import safe_open

    key_to_module = {f"{name}.weight": name for name in names}
    found: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key in key_to_module:
                    found[key_to_module[key]] = handle.get_tensor(key)
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"{directory} has no saved weight for {len(missing)} layers, e.g. {missing[0]}")
    return found


def _finish(config, source, out, trainer, result, masks, manifest, sparsity_before, perplexity_before,
            perplexity_after, fingerprint, supervised_tokens, started, resumed_tokens) -> dict[str, Any]:
    """Check the saved draft and write the training log, manifest and summary (main process).

    The mask check reads the saved safetensors files, so it covers the files a user loads.
    """
    from .prune import MANIFEST_NAME, MASKS_NAME, library_versions

    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    log = [{"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate"),
            "grad_norm": entry.get("grad_norm"), "epoch": entry.get("epoch")} for entry in steps]
    atomic_write_json(out / TRAINING_LOG_NAME, log)
    metrics = result.metrics
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    violations, sparsity_after = {}, {}
    if masks:
        weights = saved_weights(out, list(masks))
        violations = {name: int((weights[name] != 0)[~mask].sum()) for name, mask in masks.items()}
        sparsity_after = {name: float((weights[name] == 0).float().mean()) for name in masks}
        del weights
    runtime = float(metrics.get("train_runtime", 0.0))
    # After a resume, the runtime covers the resumed steps only, so the tokens seen before the
    # checkpoint are left out of the rate.
    tokens_this_run = tokens_seen - (resumed_tokens or 0)
    summary = {
        "fingerprint": fingerprint,
        "settings": config.settings(),
        "steps": int(trainer.state.global_step),
        "train_loss": float(metrics.get("train_loss", float("nan"))),
        "first_loss": log[0]["loss"] if log else None,
        "final_loss": log[-1]["loss"] if log else None,
        "num_train_conversations": len(trainer.train_dataset),
        "num_supervised_tokens": int(supervised_tokens),
        "num_input_tokens_seen": tokens_seen,
        "train_runtime": runtime,
        "tokens_per_second": tokens_this_run / runtime if runtime else None,
        "heldout_perplexity_before": perplexity_before,
        "heldout_perplexity_after": perplexity_after,
        "sparse": masks is not None,
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_after,
        "mask_violations": int(sum(violations.values())),
        "masks_fingerprint": masks_fingerprint(masks) if masks else None,
        "versions": library_versions(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if masks:
        if summary["mask_violations"]:
            raise RuntimeError(
                f"the mask did not hold: {summary['mask_violations']} pruned weights are nonzero "
                f"in the saved draft {out}; the fixed-mask callback failed for this setup"
            )
        shutil.copyfile(Path(source) / MASKS_NAME, out / MASKS_NAME)
        # The pruning masks and their per-layer sparsity are unchanged; the weights' zero
        # fractions (pruned weights plus kept weights that were already zero) are added.
        updated = dict(manifest)
        updated["finetune"] = {
            "base_draft": config.model, "data": list(config.data), "steps": summary["steps"],
            "masks_fingerprint": summary["masks_fingerprint"], "mask_violations": 0,
            "weight_sparsity": sparsity_after, "versions": library_versions(),
        }
        atomic_write_json(out / MANIFEST_NAME, updated)
    if not config.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    atomic_write_json(out / SUMMARY_NAME, summary)
    logger.info("Fine-tuned %s for %d steps: loss %.4f -> %.4f, %.0f tokens/s; saved to %s",
                config.model, summary["steps"], summary["first_loss"] or float("nan"),
                summary["final_loss"] or float("nan"), summary["tokens_per_second"] or 0.0, out)
    return summary


def recorded_settings(out: str | os.PathLike) -> dict[str, Any] | None:
    """Return the settings of the run in an output folder (finished or with checkpoints), or None."""
    out = Path(out)
    for record in (read_json(out / SUMMARY_NAME), read_json(out / CHECKPOINTS_DIR / SETTINGS_NAME)):
        if record is not None:
            return record["settings"]
    return None


def read_training_log(directory: str | os.PathLike) -> list[dict]:
    """Read ``training_log.json`` of a fine-tuned draft: one entry per step."""
    log = read_json(Path(directory) / TRAINING_LOG_NAME)
    if log is None:
        raise FileNotFoundError(f"{Path(directory) / TRAINING_LOG_NAME} not found; run `sd2 finetune` first")
    return log


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="draft: Hub id or folder (a pruned folder keeps its mask)")
    parser.add_argument("--data", required=True, action="append",
                        help="distilled folder (`sd2 distill --out`); repeat to train on several")
    parser.add_argument("--out", required=True, help="output folder of the fine-tuned draft")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps to train")
    length.add_argument("--epochs", type=float, default=1.0,
                        help="passes over the data when --max-steps is not given (default: 1)")
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="peak learning rate (default: 2e-5)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="conversations per step and process (default: 4)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1,
                        help="batches summed into one optimizer step (default: 1)")
    parser.add_argument("--max-seq-length", type=int, default=1024,
                        help="tokens per conversation; longer ones are cut (default: 1024)")
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="warm-up: a fraction of the steps if below 1, else steps (default: 0.1)")
    parser.add_argument("--lr-scheduler", default="cosine",
                        help="transformers schedule name: cosine, linear, constant_with_warmup (default: cosine)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default: 0)")
    parser.add_argument("--optim", default="adamw_torch",
                        help="transformers optimizer name, e.g. adamw_torch or adafactor (default: adamw_torch)")
    parser.add_argument("--freeze-embeddings", action="store_true",
                        help="do not train the input embeddings and lm_head")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU); weights stay fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass to save memory")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="conversations to read from the data (default: all)")
    parser.add_argument("--num-heldout", type=int, default=0,
                        help="conversations kept out of training for held-out perplexity (default: 0)")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and initialisation")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="delete --out and train from the start")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep --out/checkpoints after training")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        model=args.model, data=args.data, out=args.out, max_steps=args.max_steps, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_seq_length=args.max_seq_length,
        warmup=args.warmup, lr_scheduler=args.lr_scheduler, weight_decay=args.weight_decay,
        optim=args.optim, freeze_embeddings=args.freeze_embeddings, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, num_samples=args.num_samples,
        num_heldout=args.num_heldout, save_steps=args.save_steps, seed=args.seed, resume=args.resume,
        overwrite=args.overwrite, keep_checkpoints=args.keep_checkpoints,
    )


def _format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"steps: {summary['steps']}",
        f"loss: {summary['first_loss']:.4f} (first step) -> {summary['final_loss']:.4f} (last step)",
        f"tokens/s: {summary['tokens_per_second']:.1f}" if summary["tokens_per_second"] else "tokens/s: n/a",
    ]
    if summary["heldout_perplexity_after"] is not None:
        lines.append(f"held-out perplexity: {summary['heldout_perplexity_before']:.3f} -> "
                     f"{summary['heldout_perplexity_after']:.3f}")
    if summary["sparse"]:
        lines.append(f"mask: held ({summary['mask_violations']} violations), fingerprint "
                     f"{summary['masks_fingerprint'][:12]}")
    return "\n".join(lines)


def _finetune_command(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = finetune(config_from_args(args))
    if summary is not None:
        print(_format_summary(summary))
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a draft on distilled data, keeping a sparse draft's mask fixed")
    add_arguments(parser)
    parser.set_defaults(func=_finetune_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m sd2_utils.finetune`` (``accelerate launch -m``, ``torchrun -m``)."""
    parser = argparse.ArgumentParser(prog="python -m sd2_utils.finetune", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SD2_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return _finetune_command(args)


if __name__ == "__main__":
    sys.exit(main())
