"""Speculative decoding engine: chain drafting, lossless verification and per-round records.

A draft model proposes up to K tokens (``num_assistant_tokens``) per round and the target
verifies them in one forward pass (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"):

- greedy verification accepts the longest drafted prefix that equals the target's argmax and
  appends the target's own next token, so the output equals the target's greedy decoding;
- sampling verification accepts drafted token x with probability min(1, p(x) / q(x)) and, on a
  rejection, samples from the normalized residual max(0, p - q), so the output follows the
  target's distribution p exactly (after temperature, top-k and top-p).

Two drafters exist. ``SharedTokenizerDrafter`` serves a draft with the target's vocabulary.
``TextReencodingDrafter`` serves a draft with another tokenizer (universal assisted generation):
drafted text is re-encoded with the target tokenizer, and accepted target text is re-encoded
with the draft tokenizer from a few tokens back (the look-behind window), because a token
boundary near the end of a text can move when more text follows it.

Both models keep a ``transformers.DynamicCache`` that is cropped back to the longest prefix
still valid after each round. Batch size is 1 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

logger = logging.getLogger(__name__)

# Chosen default: re-encode this many tokens before the first changed one. Byte-level BPE merges
# reach back at most a word or two, so a few tokens cover a moved boundary.
DEFAULT_LOOKBEHIND = 8
# Chosen default: below this share of the draft's token texts present in the target's vocabulary,
# the pair is rejected. Qwen2.5 and SmolLM2 share 80%, Qwen2.5 and Gemma 3 share 37%.
MIN_VOCABULARY_OVERLAP = 0.10
SCHEDULES = ("constant", "heuristic")
# Different-tokenizer drafting: text re-encoding, or token-level intersection (`sd2_utils.uag`).
UAG_MODES = ("text", "intersection")


# ----------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass
class RoundRecord:
    """One verification round.

    Attributes:
        num_drafted: candidate tokens the target verified, in target tokens.
        num_draft_tokens: tokens the draft generated, in draft tokens (differs from
            `num_drafted` only with different tokenizers).
        num_accepted: candidate tokens the target accepted.
        num_emitted: tokens appended to the output (accepted plus the target's own token, fewer
            when EOS ends the answer inside the block).
        draft_forward_passes: draft forward calls this round.
        target_forward_passes: target forward calls this round (always 1).
        draft_time: seconds spent in draft forward passes and picking draft tokens.
        verify_time: seconds spent in the target forward pass and verification.
        reencode_time: seconds spent converting text between tokenizers (0 with a shared one).
    """

    num_drafted: int
    num_draft_tokens: int
    num_accepted: int
    num_emitted: int
    draft_forward_passes: int
    target_forward_passes: int
    draft_time: float
    verify_time: float
    reencode_time: float


@dataclasses.dataclass
class SpeculativeOutput:
    """Result of one generation.

    Attributes:
        sequences: prompt and new tokens, shape (1, prompt_length + num_new_tokens).
        prompt_length: tokens in the prompt.
        rounds: one record per verification round (per target forward pass).
        stop_reason: ``eos``, ``max_new_tokens`` or ``max_length`` (the context limit).
        wall_time: seconds from the first forward pass to the last token.
    """

    sequences: torch.Tensor
    prompt_length: int
    rounds: list[RoundRecord]
    stop_reason: str
    wall_time: float

    @property
    def new_token_ids(self) -> list[int]:
        return self.sequences[0, self.prompt_length:].tolist()

    @property
    def num_new_tokens(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    @property
    def accept_lengths(self) -> list[int]:
        """Tokens emitted per round, the quantity Spec-Bench calls `accept_lengths`."""
        return [record.num_emitted for record in self.rounds]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted / target forward passes (see ``sd2_utils.metrics``)."""
        passes = sum(record.target_forward_passes for record in self.rounds)
        return self.num_new_tokens / passes if passes else math.nan


# ----------------------------------------------------------------------------------------------
# Sampling and verification (pure functions)


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Turn logits into sampling probabilities after temperature, top-k and top-p.

    Args:
        logits: shape (n, vocab).
        temperature: > 0. Divides the logits.
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p;
            1.0 keeps all. The most likely token is always kept.

    Returns:
        Float32 probabilities, shape (n, vocab), each row summing to 1.
    """
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return torch.softmax(logits, dim=-1)


def verify_greedy(candidate_ids: Sequence[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Accept the longest prefix of the candidates that matches the target's argmax.

    Args:
        candidate_ids: k drafted tokens, in target tokens.
        target_logits: shape (k + 1, vocab); row i predicts the token after candidate i - 1
            (row 0 the token after the committed sequence).

    Returns:
        (num_accepted, next_token): the target's own token after the accepted prefix (a
        correction, or the bonus token when all k are accepted).
    """
    choices = torch.argmax(target_logits, dim=-1).tolist()
    num_accepted = 0
    for candidate, choice in zip(candidate_ids, choices):
        if candidate != choice:
            break
        num_accepted += 1
    return num_accepted, choices[num_accepted]


def verify_sampling(
    candidate_ids: Sequence[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling: accept each candidate with probability min(1, p / q).

    On the first rejection the next token is sampled from max(0, p - q), normalized, so each
    emitted token follows p exactly. When all candidates are accepted the bonus token is
    sampled from p.

    Args:
        candidate_ids: k drafted tokens, in target tokens.
        draft_probs: q, shape (k, vocab), the distributions the candidates were sampled from,
            or None when the draft's distribution is unknown in the target's vocabulary
            (different tokenizers). Then q is one-hot on each candidate, which is still exact:
            the acceptance probability becomes p(x) and the residual is p without x.
        target_probs: p, shape (k + 1, vocab).
        generator: random source, for reproducible runs.

    Returns:
        (num_accepted, next_token).
    """
    device = target_probs.device
    for position, candidate in enumerate(candidate_ids):
        p = target_probs[position]
        q_of_candidate = 1.0 if draft_probs is None else float(draft_probs[position, candidate])
        ratio = float(p[candidate]) / q_of_candidate if q_of_candidate > 0 else 0.0
        if float(torch.rand((), generator=generator, device=device)) < min(1.0, ratio):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[candidate] = 0.0
        else:
            residual = torch.clamp(p - draft_probs[position], min=0.0)
        total = float(residual.sum())
        # A zero residual means p == q (up to rounding), where rejection has probability 0.
        residual = residual / total if total > 0 else p
        next_token = int(torch.multinomial(residual, 1, generator=generator))
        return position, next_token
    bonus = int(torch.multinomial(target_probs[len(candidate_ids)], 1, generator=generator))
    return len(candidate_ids), bonus


# ----------------------------------------------------------------------------------------------
# Models with a cache


class CachedModel:
    """A causal LM and its KV cache, kept in step with a token sequence.

    ``logits_for(ids)`` crops the cache to the longest prefix it shares with `ids`, feeds the
    rest and returns the logits of the last positions. Batch size 1.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.ids: list[int] = []
        self.forward_passes = 0
        self.device = next(model.parameters()).device

    @property
    def max_length(self) -> int | None:
        """Context limit from the configuration (``max_position_embeddings``), if any."""
        config = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(config, "max_position_embeddings", None)

    def logits_for(self, ids: Sequence[int], num_logits: int = 1) -> torch.Tensor:
        """Return logits of the last `num_logits` positions of `ids`, shape (num_logits, vocab)."""
        keep = _common_prefix_length(self.ids, ids)
        # At least one token must go through the model to produce logits.
        keep = min(keep, len(ids) - num_logits)
        if keep < len(self.ids):
            # transformers 5 `crop` takes the number of tokens to remove as a negative value.
            self.cache.crop(keep - len(self.ids))
            del self.ids[keep:]
        new_ids = list(ids[keep:])
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        output = self.model(
            input_ids=input_ids,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=num_logits,
        )
        self.ids.extend(new_ids)
        self.forward_passes += 1
        return output.logits[0, -num_logits:]


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    for index in range(n):
        if a[index] != b[index]:
            return index
    return n


# ----------------------------------------------------------------------------------------------
# Vocabulary comparison


def same_vocabulary(first_tokenizer, second_tokenizer) -> bool:
    """Whether two tokenizers map the same token strings to the same ids.

    Compares the vocabularies themselves: ``vocab_size`` and the models' embedding sizes can
    agree for different vocabularies and differ for the same one (Qwen2.5 pads its embedding).
    """
    return first_tokenizer.get_vocab() == second_tokenizer.get_vocab()


@functools.lru_cache(maxsize=8)
def _token_texts(tokenizer) -> frozenset[str]:
    ids = [[index] for index in range(len(tokenizer))]
    return frozenset(
        tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    )


def vocabulary_overlap(draft_tokenizer, target_tokenizer) -> float:
    """Share of the draft's token texts that are also the text of some target token.

    Token texts are compared after decoding, so the byte-level markers of different BPE
    families (``Ġ``, ``▁``) do not count as differences.
    """
    draft_texts = _token_texts(draft_tokenizer)
    return len(draft_texts & _token_texts(target_tokenizer)) / max(len(draft_texts), 1)


def check_vocabulary_overlap(
    draft_tokenizer, target_tokenizer, minimum: float = MIN_VOCABULARY_OVERLAP
) -> float:
    """Raise ValueError when the draft's vocabulary shares almost nothing with the target's."""
    overlap = vocabulary_overlap(draft_tokenizer, target_tokenizer)
    if overlap < minimum:
        raise ValueError(
            f"draft tokenizer {getattr(draft_tokenizer, 'name_or_path', '?')!r} shares only "
            f"{overlap:.1%} of its token texts with target tokenizer "
            f"{getattr(target_tokenizer, 'name_or_path', '?')!r} (minimum {minimum:.0%}). The draft "
            "cannot write the target's text, so nearly every drafted token would be rejected. "
            "Pick a draft trained on the same languages and scripts as the target"
        )
    return overlap


# ----------------------------------------------------------------------------------------------
# Drafters


@dataclasses.dataclass
class DraftProposal:
    """Candidate tokens from one drafting step.

    Attributes:
        candidate_ids: proposed target tokens.
        draft_probs: q for each candidate, shape (len(candidate_ids), target vocab), or None
            when the draft's distribution is not over the target's vocabulary.
        num_draft_tokens: tokens the draft generated, in its own tokens.
        draft_time, reencode_time: seconds, as in ``RoundRecord``.
        forward_passes: draft forward calls.
    """

    candidate_ids: list[int]
    draft_probs: torch.Tensor | None
    num_draft_tokens: int
    forward_passes: int
    draft_time: float
    reencode_time: float


@dataclasses.dataclass
class SamplingSettings:
    """Decoding settings shared by draft and target. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Pick a token from logits of shape (vocab,); return it and its distribution (None if greedy)."""
        if self.greedy:
            return int(torch.argmax(logits)), None
        probs = logits_to_probs(logits[None], self.temperature, self.top_k, self.top_p)[0]
        return int(torch.multinomial(probs, 1, generator=self.generator)), probs


def _generate_draft_tokens(
    runner: CachedModel,
    ids: list[int],
    num_tokens: int,
    sampling: SamplingSettings,
    stop_ids: set[int],
) -> tuple[list[int], list[torch.Tensor | None]]:
    """Run the draft autoregressively for up to `num_tokens` tokens after `ids`."""
    tokens: list[int] = []
    distributions: list[torch.Tensor | None] = []
    context = list(ids)
    for _ in range(num_tokens):
        logits = runner.logits_for(context, 1)[0]
        token, probs = sampling.pick(logits)
        tokens.append(token)
        distributions.append(probs)
        context.append(token)
        if token in stop_ids:
            break
    return tokens, distributions


class SharedTokenizerDrafter:
    """Drafts with a model that uses the target's vocabulary: candidates are the draft's tokens."""

    def __init__(self, draft: torch.nn.Module, sampling: SamplingSettings, stop_ids: set[int]):
        self.runner = CachedModel(draft)
        self.sampling = sampling
        self.stop_ids = stop_ids

    @property
    def max_length(self) -> int | None:
        return self.runner.max_length

    def start(self, prompt_ids: list[int]) -> None:
        """Reset for a new prompt (the cache is rebuilt on the first proposal)."""
        self.runner = CachedModel(self.runner.model)

    def propose(self, target_ids: list[int], max_candidates: int, target_vocab_size: int) -> DraftProposal:
        """Draft up to `max_candidates` tokens after `target_ids`."""
        if self.max_length is not None:
            max_candidates = min(max_candidates, self.max_length - len(target_ids))
        if max_candidates <= 0:
            return DraftProposal([], None, 0, 0, 0.0, 0.0)
        started = time.perf_counter()
        passes_before = self.runner.forward_passes
        tokens, distributions = _generate_draft_tokens(
            self.runner, target_ids, max_candidates, self.sampling, self.stop_ids
        )
        # A draft embedding padded past the target's vocabulary can emit ids the target lacks.
        for index, token in enumerate(tokens):
            if token >= target_vocab_size:
                del tokens[index:], distributions[index:]
                break
        draft_probs = None
        if not self.sampling.greedy and distributions:
            draft_probs = _resize_vocab(torch.stack(distributions), target_vocab_size)
        return DraftProposal(
            candidate_ids=tokens,
            draft_probs=draft_probs,
            num_draft_tokens=len(tokens),
            forward_passes=self.runner.forward_passes - passes_before,
            draft_time=time.perf_counter() - started,
            reencode_time=0.0,
        )


def _resize_vocab(probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pad with zeros or cut the last dimension to `vocab_size` (embedding sizes may be padded)."""
    if probs.shape[-1] >= vocab_size:
        return probs[..., :vocab_size]
    return torch.nn.functional.pad(probs, (0, vocab_size - probs.shape[-1]))


class TokenText:
    """Token ids of one tokenizer, the text they decode to and where each token's text ends.

    Decoding is incremental (a short prefix window is decoded again for each new token), so
    appending costs the same whatever the length. A token that ends inside a multi-byte
    character adds no text and marks its boundary as not clean; text and ids can be cut only
    at clean boundaries.
    """

    # Tokens decoded before the new ones, so tokenizers that drop a leading space at the
    # start of a decode (SentencePiece) still produce it.
    PREFIX_TOKENS = 4

    def __init__(self, tokenizer, ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.ends: list[int] = []  # ends[i]: length of the complete text of ids[:i + 1]
        self.clean: list[bool] = []  # clean[i]: ids[:i + 1] ends on a character boundary
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self.extend(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text_end(self, boundary: int) -> int:
        """Length of the text of ids[:boundary]."""
        return self.ends[boundary - 1] if boundary > 0 else 0

    def is_clean(self, boundary: int) -> bool:
        return boundary == 0 or self.clean[boundary - 1]

    def clean_boundary_before(self, boundary: int, steps_back: int = 0) -> int:
        """The largest clean boundary <= `boundary` after moving back `steps_back` tokens."""
        boundary = max(0, min(boundary, len(self.ids)) - steps_back)
        while not self.is_clean(boundary):
            boundary -= 1
        return boundary

    def extend(self, new_ids: Iterable[int]) -> None:
        for token in new_ids:
            self.ids.append(int(token))
            prefix_text = self.decode(self.ids[self._prefix_offset:self._read_offset])
            full_text = self.decode(self.ids[self._prefix_offset:])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                self.text += full_text[len(prefix_text):]
                self.clean.append(True)
                self._prefix_offset = self.clean_boundary_before(self._read_offset)
                self._read_offset = len(self.ids)
            else:
                self.clean.append(False)
            self.ends.append(len(self.text))

    def truncate(self, boundary: int) -> None:
        """Keep ids[:boundary], moving back to the previous clean boundary if it splits a character."""
        boundary = self.clean_boundary_before(boundary)
        del self.ids[boundary:], self.ends[boundary:], self.clean[boundary:]
        self.text = self.text[: self.text_end(boundary)]
        self._read_offset = boundary
        self._prefix_offset = self.clean_boundary_before(boundary, self.PREFIX_TOKENS)


def _common_text_prefix_length(a: str, b: str, start: int = 0) -> int:
    """Length of the common prefix of `a` and `b`, given that a[:start] == b[:start]."""
    limit = min(len(a), len(b))
    start = min(start, limit)
    if a[start:limit] == b[start:limit]:
        return limit
    index = start
    while index < limit and a[index] == b[index]:
        index += 1
    return index


class TextReencodingDrafter:
    """Drafts with a model whose tokenizer differs from the target's (universal assisted generation).

    The drafter keeps the target's committed tokens and their text, and its own token sequence
    whose text follows the target's. Each proposal:

    1. re-encodes the target text added since the last round with the draft tokenizer,
       starting `lookbehind` draft tokens before the first character that changed, and crops
       the draft cache to the tokens that stayed the same;
    2. runs the draft for up to K of its own tokens and decodes the new text;
    3. re-encodes the last `lookbehind` committed target tokens' text plus the new text with the
       target tokenizer. When the result starts with the committed tokens, the rest are the
       candidates; otherwise (a merge across the boundary) the new text alone is encoded.

    Candidates are any target tokens, and the target verifies them, so the output stays the
    target's own greedy output whatever the re-encoding does. Only the acceptance rate depends
    on it.
    """

    def __init__(
        self,
        draft: torch.nn.Module,
        draft_tokenizer,
        target_tokenizer,
        sampling: SamplingSettings,
        lookbehind: int = DEFAULT_LOOKBEHIND,
    ):
        if lookbehind < 1:
            raise ValueError(f"`lookbehind` must be >= 1, got {lookbehind}")
        self.runner = CachedModel(draft)
        self.draft_tokenizer = draft_tokenizer
        self.target_tokenizer = target_tokenizer
        self.sampling = sampling
        self.lookbehind = lookbehind
        self.stop_ids = _eos_ids(draft_tokenizer, getattr(draft, "generation_config", None))
        self.target_text = TokenText(target_tokenizer)
        self.draft_text = TokenText(draft_tokenizer)
        self._synced_chars = 0
        self.num_fallbacks = 0

    @property
    def max_length(self) -> int | None:
        return self.runner.max_length

    def start(self, prompt_ids: list[int]) -> None:
        """Reset for a new prompt given in target tokens."""
        self.runner = CachedModel(self.runner.model)
        self.target_text = TokenText(self.target_tokenizer, prompt_ids)
        self.draft_text = TokenText(self.draft_tokenizer, self.draft_text.encode(self.target_text.text))
        self._synced_chars = _common_text_prefix_length(self.draft_text.text, self.target_text.text)

    def _sync_draft(self) -> None:
        """Make the draft's tokens spell the target's committed text."""
        target = self.target_text.text
        draft = self.draft_text
        matched = _common_text_prefix_length(draft.text, target, self._synced_chars)
        if matched == len(draft.text) == len(target):
            return
        # The last draft token that ends inside the matched text, then `lookbehind` tokens back.
        boundary = len(draft.ids)
        while boundary > 0 and draft.text_end(boundary) > matched:
            boundary -= 1
        boundary = draft.clean_boundary_before(boundary, self.lookbehind)
        tail_text = target[draft.text_end(boundary):]
        tail_ids = draft.encode(tail_text)
        draft.truncate(boundary)
        draft.extend(tail_ids)
        self._synced_chars = _common_text_prefix_length(draft.text, target, draft.text_end(boundary))

    def _to_target_ids(self, new_text: str) -> list[int]:
        """Encode drafted text as target tokens that continue the committed target tokens."""
        committed = self.target_text
        boundary = committed.clean_boundary_before(len(committed.ids), self.lookbehind)
        tail = committed.ids[boundary:]
        ids = committed.encode(committed.text[committed.text_end(boundary):] + new_text)
        if ids[: len(tail)] == tail:
            return ids[len(tail):]
        # The new text merges with committed tokens into different ones; the committed
        # tokens cannot change, so encode the new text on its own.
        self.num_fallbacks += 1
        return committed.encode(new_text)

    def propose(self, target_ids: list[int], max_candidates: int, target_vocab_size: int) -> DraftProposal:
        """Draft text after `target_ids` and return it as at most `max_candidates` target tokens."""
        started = time.perf_counter()
        self.target_text.extend(target_ids[len(self.target_text.ids):])
        self._sync_draft()
        reencode_time = time.perf_counter() - started

        num_draft_tokens = max_candidates
        if self.max_length is not None:
            num_draft_tokens = min(num_draft_tokens, self.max_length - len(self.draft_text.ids))
        if max_candidates <= 0 or num_draft_tokens <= 0:
            return DraftProposal([], None, 0, 0, 0.0, reencode_time)

        started = time.perf_counter()
        passes_before = self.runner.forward_passes
        synced_length = len(self.draft_text.ids)
        text_before = len(self.draft_text.text)
        # The sampled distributions are over the draft vocabulary, so verification treats each
        # candidate as certain (see `verify_sampling`); only the drafted tokens are kept.
        tokens, _ = _generate_draft_tokens(
            self.runner, self.draft_text.ids, num_draft_tokens, self.sampling, self.stop_ids
        )
        draft_time = time.perf_counter() - started

        started = time.perf_counter()
        self.draft_text.extend(tokens)
        new_text = self.draft_text.text[text_before:]
        candidates = self._to_target_ids(new_text)[:max_candidates] if new_text else []
        # Forget the drafted tokens' text, so the next sync starts from the committed text.
        self.draft_text.truncate(synced_length)
        reencode_time += time.perf_counter() - started
        return DraftProposal(
            candidate_ids=candidates,
            draft_probs=None,
            num_draft_tokens=len(tokens),
            forward_passes=self.runner.forward_passes - passes_before,
            draft_time=draft_time,
            reencode_time=reencode_time,
        )


# ----------------------------------------------------------------------------------------------
# Generation


def _eos_ids(tokenizer, generation_config: Any = None, eos_token_id: int | Iterable[int] | None = None) -> set[int]:
    """Collect end-of-sequence ids from an explicit value, the generation config and the tokenizer."""
    if eos_token_id is not None:
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _as_id_list(input_ids: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(
                    f"`input_ids` must have batch size 1, got shape {tuple(input_ids.shape)}; "
                    "generate one prompt at a time"
                )
            input_ids = input_ids[0]
        return input_ids.tolist()
    return [int(token) for token in input_ids]


def _validate(num_assistant_tokens: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int, schedule: str) -> None:
    if not isinstance(num_assistant_tokens, int) or num_assistant_tokens < 1:
        raise ValueError(
            f"`num_assistant_tokens` (K) must be an integer >= 1, got {num_assistant_tokens!r}; "
            "use K=1 or more drafted tokens per round, or target-only decoding for K=0"
        )
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 keeps all tokens), got {top_k}")
    if schedule not in SCHEDULES:
        raise ValueError(f"invalid `schedule` {schedule!r}; use one of {', '.join(SCHEDULES)}")


def make_drafter(
    draft: torch.nn.Module,
    sampling: SamplingSettings,
    stop_ids: set[int],
    target_tokenizer=None,
    draft_tokenizer=None,
    lookbehind: int = DEFAULT_LOOKBEHIND,
    uag_mode: str = "text",
):
    """Pick the drafter for a pair: shared vocabulary, or one of the `UAG_MODES` between tokenizers.

    Without tokenizers the vocabularies are assumed to be shared.
    """
    if uag_mode not in UAG_MODES:
        raise ValueError(f"invalid `uag_mode` {uag_mode!r}; use one of {', '.join(UAG_MODES)}")
    if target_tokenizer is None or draft_tokenizer is None:
        if (target_tokenizer is None) != (draft_tokenizer is None):
            raise ValueError(
                "pass both `target_tokenizer` and `draft_tokenizer`, or neither (a shared vocabulary)"
            )
        return SharedTokenizerDrafter(draft, sampling, stop_ids)
    if same_vocabulary(target_tokenizer, draft_tokenizer):
        return SharedTokenizerDrafter(draft, sampling, stop_ids)
    if uag_mode == "intersection":
        from .uag import IntersectionDrafter  # uag imports this module, so import it late.

        return IntersectionDrafter(draft, draft_tokenizer, target_tokenizer, sampling, lookbehind)
    check_vocabulary_overlap(draft_tokenizer, target_tokenizer)
    return TextReencodingDrafter(draft, draft_tokenizer, target_tokenizer, sampling, lookbehind)


@torch.inference_mode()
def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    input_ids: torch.Tensor | Sequence[int],
    num_assistant_tokens: int = 4,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    target_tokenizer=None,
    draft_tokenizer=None,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    schedule: str = "constant",
    max_length: int | None = None,
    lookbehind: int = DEFAULT_LOOKBEHIND,
    drafter=None,
    uag_mode: str = "text",
) -> SpeculativeOutput:
    """Generate with speculative decoding, recording every verification round.

    Args:
        target: the model whose output is reproduced.
        draft: the model that proposes tokens, or None with `drafter` given.
        input_ids: the prompt in target tokens, shape (1, n) or (n,).
        num_assistant_tokens: K, tokens drafted per round (the start value with the
            ``heuristic`` schedule).
        max_new_tokens: maximum tokens to generate.
        temperature: 0 for greedy verification, > 0 for speculative sampling.
        top_p, top_k: sampling filters, applied to draft and target alike.
        target_tokenizer, draft_tokenizer: both or neither. When their vocabularies differ,
            the draft's text is re-encoded (``TextReencodingDrafter``).
        eos_token_id: id or ids that end the answer; defaults to the target's generation
            config and tokenizer.
        generator: random source for sampling.
        schedule: ``constant`` keeps K fixed. ``heuristic`` adds 2 to K after a round that
            accepts every candidate and subtracts 1 (down to 1) otherwise, like the
            ``heuristic`` schedule of ``transformers`` assisted generation.
        max_length: context limit in target tokens; defaults to the target's
            ``max_position_embeddings``.
        lookbehind: tokens re-encoded before a change, with different tokenizers.
        drafter: a ready drafter (``SharedTokenizerDrafter``, ``TextReencodingDrafter`` or one
            with the same ``start``/``propose`` methods), used instead of building one.
        uag_mode: with different tokenizers, ``text`` re-encodes drafted text and ``intersection``
            drafts only tokens both vocabularies share (``sd2_utils.uag.IntersectionDrafter``),
            which keeps the draft's probabilities for speculative sampling.

    Returns:
        A ``SpeculativeOutput``.
    """
    _validate(num_assistant_tokens, max_new_tokens, temperature, top_p, top_k, schedule)
    sampling = SamplingSettings(temperature, top_p, top_k, generator)
    stop_ids = _eos_ids(target_tokenizer, getattr(target, "generation_config", None), eos_token_id)
    if drafter is None:
        if draft is None:
            raise ValueError("pass a `draft` model or a ready `drafter`")
        drafter = make_drafter(draft, sampling, stop_ids, target_tokenizer, draft_tokenizer, lookbehind,
                               uag_mode)
    else:
        drafter.sampling = sampling

    prompt = _as_id_list(input_ids)
    if not prompt:
        raise ValueError("`input_ids` is empty; the prompt needs at least one token")
    verifier = CachedModel(target)
    limit = max_length or verifier.max_length or len(prompt) + max_new_tokens
    if len(prompt) >= limit:
        raise ValueError(
            f"prompt has {len(prompt)} tokens, which reaches the context limit of {limit} "
            "(`max_length` or the target's max_position_embeddings); shorten the prompt"
        )
    target_vocab_size = target.get_output_embeddings().weight.shape[0]

    ids = list(prompt)
    rounds: list[RoundRecord] = []
    k = num_assistant_tokens
    stop_reason = "max_new_tokens"
    drafter.start(prompt)
    started = time.perf_counter()
    while True:
        remaining = min(max_new_tokens - (len(ids) - len(prompt)), limit - len(ids))
        if remaining <= 0:
            stop_reason = "max_new_tokens" if len(ids) - len(prompt) >= max_new_tokens else "max_length"
            break
        # One token always comes from the target itself, so draft at most remaining - 1.
        proposal = drafter.propose(ids, min(k, remaining - 1), target_vocab_size)
        candidates = proposal.candidate_ids

        verify_started = time.perf_counter()
        logits = verifier.logits_for(ids + candidates, len(candidates) + 1)
        if sampling.greedy:
            num_accepted, next_token = verify_greedy(candidates, logits)
        else:
            target_probs = logits_to_probs(logits, temperature, top_k, top_p)
            num_accepted, next_token = verify_sampling(
                candidates, proposal.draft_probs, target_probs, generator
            )
        emitted = candidates[:num_accepted] + [next_token]
        for index, token in enumerate(emitted):
            if token in stop_ids:
                emitted = emitted[: index + 1]
                stop_reason = "eos"
                break
        ids.extend(emitted)
        verify_time = time.perf_counter() - verify_started

        rounds.append(
            RoundRecord(
                num_drafted=len(candidates),
                num_draft_tokens=proposal.num_draft_tokens,
                num_accepted=min(num_accepted, len(emitted)),
                num_emitted=len(emitted),
                draft_forward_passes=proposal.forward_passes,
                target_forward_passes=1,
                draft_time=proposal.draft_time,
                verify_time=verify_time,
                reencode_time=proposal.reencode_time,
            )
        )
        if stop_reason == "eos":
            break
        if schedule == "heuristic" and candidates:
            k = k + 2 if num_accepted == len(candidates) else max(1, k - 1)

    return SpeculativeOutput(
        sequences=torch.tensor([ids], dtype=torch.long),
        prompt_length=len(prompt),
        rounds=rounds,
        stop_reason=stop_reason,
        wall_time=time.perf_counter() - started,
    )


@torch.inference_mode()
def target_generate(
    target: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int = 128,
    target_tokenizer=None,
    eos_token_id: int | Iterable[int] | None = None,
    max_length: int | None = None,
) -> SpeculativeOutput:
    """Greedy decoding with the target alone, one forward pass per token: the reference output.

    Uses the same cache handling as ``speculative_generate``, so timings compare like for like.
    Each round emits one token (MAL 1).
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
    stop_ids = _eos_ids(target_tokenizer, getattr(target, "generation_config", None), eos_token_id)
    prompt = _as_id_list(input_ids)
    runner = CachedModel(target)
    limit = max_length or runner.max_length or len(prompt) + max_new_tokens
    ids = list(prompt)
    rounds: list[RoundRecord] = []
    stop_reason = "max_new_tokens"
    started = time.perf_counter()
    while len(ids) - len(prompt) < max_new_tokens:
        if len(ids) >= limit:
            stop_reason = "max_length"
            break
        step_started = time.perf_counter()
        token = int(torch.argmax(runner.logits_for(ids, 1)[0]))
        ids.append(token)
        rounds.append(RoundRecord(0, 0, 0, 1, 0, 1, 0.0, time.perf_counter() - step_started, 0.0))
        if token in stop_ids:
            stop_reason = "eos"
            break
    return SpeculativeOutput(
        sequences=torch.tensor([ids], dtype=torch.long),
        prompt_length=len(prompt),
        rounds=rounds,
        stop_reason=stop_reason,
        wall_time=time.perf_counter() - started,
    )
