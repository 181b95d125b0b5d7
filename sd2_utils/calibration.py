"""Calibration and held-out token samples for pruning, and perplexity on them.

A calibration source is either a distilled folder (the ``--out`` of ``sd2 distill``, read with
``sd2_utils.distill.load_distilled``) or a data set name (``sharegpt``, ``gsm8k``). Each
conversation is rendered through the draft's chat template. A tokenizer without one (a base
model) gets the turns joined by blank lines. The token ids of successive conversations are
concatenated, and the stream is cut into samples of exactly ``max_seq_length`` tokens.

Calibration takes conversations from the start of the source and held-out samples from its
end, so the two never share a conversation while the source is large enough for both.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# ShareGPT conversations are drawn in a fixed shuffled order; calibration and held-out samples
# come from opposite ends of it.
SHAREGPT_SEED = 0


def load_conversations(source: str | os.PathLike) -> tuple[list[list[dict]], dict[str, Any]]:
    """Load the conversations of a calibration source.

    Args:
        source: a distilled folder, or ``sharegpt`` or ``gsm8k``.

    Returns:
        (conversations, description): each conversation is a list of ``{"role", "content"}``
        turns; the description records ``kind`` (``distilled`` or ``dataset``) and ``source``.

    Raises:
        FileNotFoundError: `source` looks like a path but does not exist.
        ValueError: an unknown data set name, or a source without conversations.
    """
    path = Path(source)
    if path.is_dir():
        from .distill import load_distilled

        rows = load_distilled(path)
        description = {"kind": "distilled", "source": str(path)}
    elif str(source) == "sharegpt":
        from .data import load_sharegpt

        rows = load_sharegpt(seed=SHAREGPT_SEED).shuffle(seed=SHAREGPT_SEED)
        # The parsed file stays in a cache of `sd2_utils.data`, which can grow to about 1 GiB of
        # Python objects (an estimate). Pruning needs only the token samples, so release it.
        from .data import _parse_sharegpt

        _parse_sharegpt.cache_clear()
        description = {"kind": "dataset", "source": "sharegpt", "seed": SHAREGPT_SEED}
    elif str(source) == "gsm8k":
        from .data import load_gsm8k

        rows = load_gsm8k("train")
        description = {"kind": "dataset", "source": "gsm8k (train)"}
    elif os.sep in str(source) or str(source).startswith("."):
        raise FileNotFoundError(
            f"calibration folder {str(source)!r} not found; run `sd2 distill` first or pass a "
            f"data set name (sharegpt, gsm8k)"
        )
    else:
        raise ValueError(
            f"invalid calibration source {str(source)!r}: pass a distilled folder or one of "
            f"sharegpt, gsm8k"
        )
    conversations = [list(row["turns"]) for row in rows if row["turns"]]
    if not conversations:
        raise ValueError(f"empty calibration set: {str(source)!r} contains no conversations")
    return conversations, description


def render_conversation(tokenizer, turns: Sequence[dict]) -> str:
    """Render turns as the model receives them: its chat template, or blank-line-joined text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(turns), tokenize=False)
    return "\n\n".join(turn["content"] for turn in turns)


def pack_samples(
    conversations: Iterable[Sequence[dict]],
    tokenizer,
    num_samples: int,
    max_seq_length: int,
) -> tuple[list[torch.Tensor], int]:
    """Tokenize conversations in order and cut the stream into equal-length samples.

    Returns:
        (samples, conversations_used): up to `num_samples` tensors of shape
        ``[max_seq_length]`` (fewer when the conversations run out).
    """
    samples: list[torch.Tensor] = []
    buffer: list[int] = []
    used = 0
    for turns in conversations:
        if len(samples) >= num_samples:
            break
        text = render_conversation(tokenizer, turns)
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        used += 1
        while len(buffer) >= max_seq_length and len(samples) < num_samples:
            samples.append(torch.tensor(buffer[:max_seq_length], dtype=torch.long))
            buffer = buffer[max_seq_length:]
    return samples, used


def fingerprint(samples: Sequence[torch.Tensor]) -> str:
    """Return the sha256 of the samples' token ids (the same ids give the same digest)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def build_calibration(
    source: str | os.PathLike,
    tokenizer,
    num_calibration_samples: int,
    max_seq_length: int,
    num_heldout_samples: int = 0,
    heldout_max_seq_length: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """Build calibration samples from the start of `source` and held-out ones from its end.

    Returns:
        (calibration, heldout, record): lists of ``[max_seq_length]`` token-id tensors, and a
        record for the sparsity manifest (source, sizes, token count, sha256 fingerprint).

    Raises:
        ValueError: non-positive sizes, or no sample could be built (empty calibration set).
    """
    if num_calibration_samples < 1 or max_seq_length < 1:
        raise ValueError(
            f"empty calibration set: num_calibration_samples={num_calibration_samples} and "
            f"max_seq_length={max_seq_length} must both be >= 1"
        )
    conversations, description = load_conversations(source)
    calibration, used = pack_samples(conversations, tokenizer, num_calibration_samples, max_seq_length)
    if not calibration:
        raise ValueError(
            f"empty calibration set: {description['source']} has fewer than max_seq_length="
            f"{max_seq_length} tokens in all; lower --max-seq-length or add data"
        )
    if len(calibration) < num_calibration_samples:
        logger.warning(
            "Calibration source %s yields %d samples of %d tokens, fewer than the %d requested",
            description["source"], len(calibration), max_seq_length, num_calibration_samples,
        )
    heldout: list[torch.Tensor] = []
    heldout_used = 0
    if num_heldout_samples > 0:
        heldout, heldout_used = pack_samples(
            reversed(conversations), tokenizer, num_heldout_samples,
            heldout_max_seq_length or max_seq_length,
        )
        if used + heldout_used > len(conversations):
            logger.warning(
                "Calibration and held-out samples share conversations: %s holds %d, calibration "
                "used %d and held-out %d; perplexity is then not fully held out",
                description["source"], len(conversations), used, heldout_used,
            )
    record = {
        **description,
        "num_calibration_samples": len(calibration),
        "num_calibration_samples_requested": num_calibration_samples,
        "max_seq_length": max_seq_length,
        "num_tokens": sum(int(sample.numel()) for sample in calibration),
        "conversations_used": used,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "fingerprint": fingerprint(calibration),
    }
    logger.info(
        "Calibration: %d samples x %d tokens from %s (%s, %d conversations), sha256 %s",
        len(calibration), max_seq_length, description["source"], description["kind"], used,
        record["fingerprint"][:12],
    )
    return calibration, heldout, record


@torch.no_grad()
def perplexity(model: torch.nn.Module, samples: Sequence[torch.Tensor]) -> float:
    """Return the perplexity of `model` on token samples: exp of the mean next-token loss.

    Args:
        samples: token ids, each ``[seq_len]``; every sample predicts ``seq_len - 1`` tokens.
    """
    if not samples:
        raise ValueError("perplexity needs at least one sample; got none")
    device = next(model.parameters()).device
    total_loss = 0.0
    total_tokens = 0
    for sample in samples:
        ids = sample.reshape(1, -1).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [seq_len-1, vocab]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total_loss += float(loss)
        total_tokens += ids.shape[1] - 1
    return math.exp(total_loss / total_tokens)
