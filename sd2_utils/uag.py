"""Universal assisted generation: drafts whose tokenizer differs from the target's.

Three parts:

- Vocabulary alignment. Each token is reduced to the bytes it stands for (GPT-2 byte-level
  characters such as ``Ġ`` and ``Ċ`` mapped back to bytes, SentencePiece's ``▁`` to a space,
  byte fallback tokens ``<0xNN>`` to their byte). Tokens of two tokenizers with the same bytes
  are the shared vocabulary, and ``VocabularyMapping`` maps ids between them. Special tokens
  match only special tokens with the same content.
- Re-encoding diagnostics. The text re-encoding path (``speculative.TextReencodingDrafter``)
  decodes drafted tokens and encodes the text with the other tokenizer. ``reencoding_statistics``
  measures on real text how often new text moves token boundaries that were already committed,
  and how many misplaced boundaries each look-behind window leaves.
- Token-level intersection (TLI; Timor et al. 2025, "Accelerating LLM Inference with Lossless
  Speculative Decoding Algorithms for Heterogeneous Vocabularies", arXiv 2502.05202).
  ``IntersectionDrafter`` restricts the draft's next-token distribution to the shared
  vocabulary and renormalizes it. A drafted token then is a target token whose probability q
  is known in the target's vocabulary. So standard speculative sampling verification (accept
  with min(1, p / q), resample from max(0, p - q)) keeps the output distributed as the target's. The engine uses it with ``speculative_generate(..., uag_mode="intersection")`` or
  with ``drafter=IntersectionDrafter(...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .io import atomic_write_json, read_json, weights_fingerprint

from .speculative import (
    DEFAULT_LOOKBEHIND,
    MIN_VOCABULARY_OVERLAP,
    DraftProposal,
    SamplingSettings,
    SpeculativeOutput,
    TextReencodingDrafter,
    logits_to_probs,
    speculative_generate,
)

logger = logging.getLogger(__name__)

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
PLAIN = "plain"
# Look-behind windows the re-encoding diagnostics sweep by default (in target tokens).
LOOKBEHIND_WINDOWS = (0, 1, 2, 5, 10)
# A conversation rendered with each chat template to compare the templates.
# It sets its own system message, so default system prompts of a family do not count.
TEMPLATE_PROBE = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about tokenizers."},
    {"role": "assistant", "content": "Bytes become tokens."},
    {"role": "user", "content": "Another one."},
)
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SENTENCEPIECE_SPACE = "\u2581"
# `owner/name` with no leading `/` or `.`: a Hub id rather than a local directory.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ----------------------------------------------------------------------------------------------
# Token bytes


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Map each character of the GPT-2 byte-level alphabet back to its byte.

    GPT-2's BPE (Radford et al. 2019) writes every byte as one printable character: the 188
    bytes that are printable Latin-1 characters stand for themselves, and the other 68 bytes
    (control characters, space, 0x7F-0xA0, 0xAD) take code points 256, 257, ... in byte order.
    So a space is ``Ġ`` (U+0120) and a newline ``Ċ`` (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(next_code_point)
            next_code_point += 1
    return {character: byte for byte, character in characters.items()}


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    return json.loads(backend.to_str())


def _component_types(component: dict | None) -> list[str]:
    """Types of a `tokenizers` pipeline component and of the steps of a ``Sequence``."""
    if not component:
        return []
    steps = component.get("decoders") or component.get("pretokenizers") or []
    return [component.get("type", "")] + [step.get("type", "") for step in steps]


def tokenizer_scheme(tokenizer) -> str:
    """Name how a tokenizer's vocabulary strings encode bytes.

    Returns:
        ``byte_level`` (GPT-2 alphabet, ``Ġ`` for a space), ``sentencepiece`` (``▁`` for a space,
        optional ``<0xNN>`` byte fallback) or ``plain`` (token strings are UTF-8 text).
    """
    decoder_types = _component_types(_backend_json(tokenizer).get("decoder"))
    if "ByteLevel" in decoder_types:
        return BYTE_LEVEL
    if {"Metaspace", "ByteFallback", "Replace"} & set(decoder_types):
        return SENTENCEPIECE
    vocab = tokenizer.get_vocab()
    # Tokenizers without a `tokenizers` backend: guess from the vocabulary itself.
    if all(character in vocab for character in byte_level_decoder()):
        return BYTE_LEVEL
    if any(token.startswith(_SENTENCEPIECE_SPACE) for token in vocab):
        return SENTENCEPIECE
    return PLAIN


def _token_content(token: str, scheme: str) -> tuple[bytes, bool]:
    """Return the bytes a vocabulary string stands for and whether it is a byte fallback token."""
    if scheme == BYTE_LEVEL:
        table = byte_level_decoder()
        if all(character in table for character in token):
            return bytes(table[character] for character in token), False
        return token.encode("utf-8"), False
    if scheme == SENTENCEPIECE:
        match = _BYTE_FALLBACK.match(token)
        if match:
            return bytes([int(match.group(1), 16)]), True
        return token.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8"), False
    return token.encode("utf-8"), False


@dataclasses.dataclass
class VocabularyInventory:
    """The bytes behind every token id of one tokenizer.

    Attributes:
        name: the tokenizer's ``name_or_path``.
        scheme: ``byte_level``, ``sentencepiece`` or ``plain`` (see ``tokenizer_scheme``).
        tokens: vocabulary string of each id (index = id).
        contents: bytes each id stands for; for a special token, its content as UTF-8.
        special: ids of special tokens (added tokens marked special).
        byte_fallback: ids of ``<0xNN>`` tokens.
    """

    name: str
    scheme: str
    tokens: list[str]
    contents: list[bytes]
    special: frozenset[int]
    byte_fallback: frozenset[int]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def regular_ids(self) -> list[int]:
        """Ids of tokens that are not special."""
        return [index for index in range(self.size) if index not in self.special]

    def content_of(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.contents[index] for index in ids)


@functools.lru_cache(maxsize=8)
def vocabulary_inventory(tokenizer) -> VocabularyInventory:
    """Build the ``VocabularyInventory`` of a Hugging Face tokenizer (cached per tokenizer)."""
    scheme = tokenizer_scheme(tokenizer)
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [""] * size
    for token, index in vocab.items():
        tokens[index] = token
    added = {index: added for index, added in tokenizer.added_tokens_decoder.items()}
    contents: list[bytes] = []
    special: set[int] = set()
    byte_fallback: set[int] = set()
    for index, token in enumerate(tokens):
        if index in added:
            # Added tokens are matched in raw text, so their content is plain UTF-8.
            contents.append(added[index].content.encode("utf-8"))
            if added[index].special:
                special.add(index)
            continue
        content, is_byte = _token_content(token, scheme)
        contents.append(content)
        if is_byte:
            byte_fallback.add(index)
    return VocabularyInventory(
        name=str(getattr(tokenizer, "name_or_path", "?")),
        scheme=scheme,
        tokens=tokens,
        contents=contents,
        special=frozenset(special),
        byte_fallback=frozenset(byte_fallback),
    )


def _canonical_ids(inventory: VocabularyInventory) -> dict[tuple[bool, bytes], int]:
    """Pick one id per (special, content) key.

    Two ids of one vocabulary can stand for the same bytes (SentencePiece ``▁`` and ``<0x20>``).
    The lowest id that is not a byte fallback token wins, so the mapping stays one-to-one.
    """
    keys: dict[tuple[bool, bytes], int] = {}
    order = sorted(range(inventory.size), key=lambda index: (index in inventory.byte_fallback, index))
    for index in order:
        content = inventory.contents[index]
        if not content:
            continue
        keys.setdefault((index in inventory.special, content), index)
    return keys


# ----------------------------------------------------------------------------------------------
# Comparison and mapping


@dataclasses.dataclass
class VocabularyComparison:
    """How much two tokenizers share, by content.

    Attributes:
        draft_name, target_name: tokenizer names.
        draft_scheme, target_scheme: how each writes bytes (see ``tokenizer_scheme``).
        draft_size, target_size: regular (not special) tokens in each vocabulary.
        exact_shared: regular vocabulary strings present in both, compared as stored.
        normalized_shared: regular tokens whose bytes appear in the other vocabulary, after
            mapping ``Ġ``/``Ċ``, ``▁`` and ``<0xNN>`` back to bytes. Byte fallback tokens that
            share bytes with another token count once.
        shared_fraction_of_draft: ``normalized_shared / draft_size``.
        shared_fraction_of_target: ``normalized_shared / target_size``.
        draft_special, target_special: special token contents of each.
        shared_special: special token contents present in both.
        draft_has_chat_template, target_has_chat_template: whether a chat template is set.
        same_chat_format: whether both templates render ``TEMPLATE_PROBE`` with the same role
            markers, None when either template is missing.
    """

    draft_name: str
    target_name: str
    draft_scheme: str
    target_scheme: str
    draft_size: int
    target_size: int
    exact_shared: int
    normalized_shared: int
    shared_fraction_of_draft: float
    shared_fraction_of_target: float
    draft_special: list[str]
    target_special: list[str]
    shared_special: list[str]
    draft_has_chat_template: bool
    target_has_chat_template: bool
    same_chat_format: bool | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _role_markers(tokenizer) -> str | None:
    """Render ``TEMPLATE_PROBE`` and blank out the message texts, leaving the role markers."""
    if not _has_chat_template(tokenizer):
        return None
    rendered = tokenizer.apply_chat_template(list(TEMPLATE_PROBE), tokenize=False,
                                             add_generation_prompt=True)
    for message in TEMPLATE_PROBE:
        rendered = rendered.replace(message["content"], "{}")
    return rendered


def compare_vocabularies(draft_tokenizer, target_tokenizer) -> VocabularyComparison:
    """Compare two tokenizers by content: shared tokens, special tokens and chat templates.

    Args:
        draft_tokenizer, target_tokenizer: Hugging Face tokenizers.

    Returns:
        A ``VocabularyComparison``.
    """
    draft = vocabulary_inventory(draft_tokenizer)
    target = vocabulary_inventory(target_tokenizer)
    draft_regular = draft.regular_ids()
    target_regular = target.regular_ids()
    target_strings = {target.tokens[index] for index in target_regular}
    exact_shared = sum(draft.tokens[index] in target_strings for index in draft_regular)

    draft_keys = {key for key in _canonical_ids(draft) if not key[0]}
    target_keys = {key for key in _canonical_ids(target) if not key[0]}
    normalized_shared = len(draft_keys & target_keys)

    draft_special = sorted(draft.contents[index].decode("utf-8") for index in draft.special)
    target_special = sorted(target.contents[index].decode("utf-8") for index in target.special)
    draft_markers, target_markers = _role_markers(draft_tokenizer), _role_markers(target_tokenizer)
    same_format = None if draft_markers is None or target_markers is None else draft_markers == target_markers
    return VocabularyComparison(
        draft_name=draft.name,
        target_name=target.name,
        draft_scheme=draft.scheme,
        target_scheme=target.scheme,
        draft_size=len(draft_regular),
        target_size=len(target_regular),
        exact_shared=exact_shared,
        normalized_shared=normalized_shared,
        shared_fraction_of_draft=normalized_shared / max(len(draft_regular), 1),
        shared_fraction_of_target=normalized_shared / max(len(target_regular), 1),
        draft_special=draft_special,
        target_special=target_special,
        shared_special=sorted(set(draft_special) & set(target_special)),
        draft_has_chat_template=_has_chat_template(draft_tokenizer),
        target_has_chat_template=_has_chat_template(target_tokenizer),
        same_chat_format=same_format,
    )


@dataclasses.dataclass
class VocabularyMapping:
    """One-to-one map between draft ids and target ids of tokens with the same content.

    Attributes:
        draft_to_target: shape (draft vocabulary,), the target id of each draft id, -1 where
            the draft token has no counterpart.
        target_to_draft: shape (target vocabulary,), the inverse, -1 where unmapped.
    """

    draft_to_target: torch.Tensor
    target_to_draft: torch.Tensor

    @classmethod
    def build(cls, draft_tokenizer, target_tokenizer, include_special: bool = True) -> "VocabularyMapping":
        """Map every draft token to the target token with the same bytes.

        Args:
            draft_tokenizer, target_tokenizer: Hugging Face tokenizers.
            include_special: also map special tokens with identical content (``<|im_end|>`` in
                both SmolLM2 and Qwen2.5), so the draft can propose the end of a turn.
        """
        draft = vocabulary_inventory(draft_tokenizer)
        target = vocabulary_inventory(target_tokenizer)
        target_keys = _canonical_ids(target)
        draft_to_target = torch.full((draft.size,), -1, dtype=torch.long)
        target_to_draft = torch.full((target.size,), -1, dtype=torch.long)
        for key, draft_id in _canonical_ids(draft).items():
            if key[0] and not include_special:
                continue
            target_id = target_keys.get(key)
            if target_id is not None:
                draft_to_target[draft_id] = target_id
                target_to_draft[target_id] = draft_id
        return cls(draft_to_target, target_to_draft)

    @property
    def num_shared(self) -> int:
        return int((self.draft_to_target >= 0).sum())

    def shared_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return aligned (draft_ids, target_ids) of the shared tokens, each shape (num_shared,)."""
        draft_ids = torch.nonzero(self.draft_to_target >= 0).flatten()
        return draft_ids, self.draft_to_target[draft_ids]

    def to_target(self, draft_ids: Sequence[int]) -> list[int]:
        """Map draft ids to target ids; raise ValueError naming the first unmapped id."""
        return _map_ids(draft_ids, self.draft_to_target, "draft")

    def to_draft(self, target_ids: Sequence[int]) -> list[int]:
        """Map target ids to draft ids; raise ValueError naming the first unmapped id."""
        return _map_ids(target_ids, self.target_to_draft, "target")

    def draft_mask(self, vocab_size: int) -> torch.Tensor:
        """Return a bool tensor of shape (vocab_size,), True at draft ids with a target id.

        `vocab_size` is the draft's logits width, which may exceed its tokenizer (padding).
        """
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        shared = torch.nonzero(self.draft_to_target >= 0).flatten()
        mask[shared[shared < vocab_size]] = True
        return mask


def _map_ids(ids: Sequence[int], table: torch.Tensor, side: str) -> list[int]:
    mapped = []
    for token in ids:
        value = int(table[token]) if 0 <= token < table.shape[0] else -1
        if value < 0:
            raise ValueError(
                f"{side} token id {token} has no counterpart in the shared vocabulary; map only ids "
                "listed by `VocabularyMapping.shared_pairs()`"
            )
        mapped.append(value)
    return mapped


def check_draft_tokenizer(
    draft_tokenizer,
    target_tokenizer,
    min_shared_fraction: float = MIN_VOCABULARY_OVERLAP,
    require_chat_template: bool = True,
) -> VocabularyComparison:
    """Reject a draft tokenizer that cannot draft usefully for the target.

    Args:
        draft_tokenizer, target_tokenizer: Hugging Face tokenizers.
        min_shared_fraction: minimum share of the draft's regular tokens that must also be
            target tokens (by content).
        require_chat_template: reject a draft without a chat template. The draft reads the
            target's chat-formatted prompt, and a base model never trained on any chat format
            drafts poorly there.

    Returns:
        The ``VocabularyComparison`` of the pair.

    Raises:
        ValueError: the pair shares too little, or the draft has no chat template.
    """
    comparison = compare_vocabularies(draft_tokenizer, target_tokenizer)
    if comparison.shared_fraction_of_draft < min_shared_fraction:
        raise ValueError(
            f"draft tokenizer {comparison.draft_name!r} shares {comparison.normalized_shared} of "
            f"its {comparison.draft_size} tokens ({comparison.shared_fraction_of_draft:.1%}) with "
            f"target tokenizer {comparison.target_name!r}, below `min_shared_fraction` "
            f"{min_shared_fraction:.1%}; an intersection-restricted draft could write almost none "
            "of the target's text. Pick a draft whose tokenizer covers the target's languages, "
            "or lower `min_shared_fraction`"
        )
    if require_chat_template and not comparison.draft_has_chat_template:
        raise ValueError(
            f"draft tokenizer {comparison.draft_name!r} has no chat template, so the draft was "
            "likely never trained on chat-formatted text like the target's prompts. Use an "
            "instruct draft, or pass `require_chat_template=False` to draft from the target's "
            "rendered prompt anyway"
        )
    return comparison


# ----------------------------------------------------------------------------------------------
# Re-encoding diagnostics


@dataclasses.dataclass
class ReencodingStatistics:
    """Text re-encoding from draft tokens to target tokens with one look-behind window.

    Two ways of streaming are measured. ``append`` never changes committed target tokens, like
    the candidates of ``TextReencodingDrafter``. A step encodes the text of the last w tokens
    plus the new text and appends what follows those w tokens. When the w tokens came out
    different, it encodes the new text on its own. ``revise`` replaces the last w tokens by
    the re-encoding, as the drafter does for the draft's own context.

    Attributes:
        lookbehind: w, the committed target tokens re-encoded together with the new text.
        num_texts: texts streamed.
        num_steps: chunks of new text appended (one per drafting round).
        boundary_changes: steps where encoding the whole text so far moved a boundary before
            the last token of the text committed before the step (the same for every window).
        window_changes: steps where re-encoding the window's text plus the new text changed
            the window's tokens (always 0 for w = 0), in ``append`` streaming. A misplaced
            boundary counts again at every step until it leaves the window.
        canonical_tokens: target tokens of encoding each whole text at once.
        streamed_tokens, revised_tokens: target tokens after ``append`` / ``revise`` streaming.
        misplaced_boundaries, revised_misplaced_boundaries: token boundaries of the streamed ids
            that the canonical encoding does not have.
        exact_texts, revised_exact_texts: texts whose streamed ids equal the canonical encoding.
    """

    lookbehind: int
    num_texts: int
    num_steps: int
    boundary_changes: int
    window_changes: int
    canonical_tokens: int
    streamed_tokens: int
    misplaced_boundaries: int
    exact_texts: int
    revised_tokens: int
    revised_misplaced_boundaries: int
    revised_exact_texts: int

    def to_dict(self) -> dict[str, Any]:
        """Return the counts plus rates: per step, per streamed token and per text."""
        def rate(count: int, total: int) -> float:
            return count / total if total else math.nan

        return {
            **dataclasses.asdict(self),
            "boundary_change_rate": rate(self.boundary_changes, self.num_steps),
            "window_change_rate": rate(self.window_changes, self.num_steps),
            "misplaced_boundary_rate": rate(self.misplaced_boundaries, self.streamed_tokens),
            "revised_misplaced_boundary_rate": rate(self.revised_misplaced_boundaries, self.revised_tokens),
            "exact_text_rate": rate(self.exact_texts, self.num_texts),
            "revised_exact_text_rate": rate(self.revised_exact_texts, self.num_texts),
        }


def _text_chunks(ids: Sequence[int], inventory: VocabularyInventory, chunk_size: int) -> list[str]:
    """Decode `ids` in chunks of `chunk_size` tokens, moving a split character to the next chunk."""
    chunks: list[str] = []
    pending = b""
    for start in range(0, len(ids), chunk_size):
        pending += inventory.content_of(ids[start:start + chunk_size])
        try:
            chunks.append(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError as error:
            if error.reason != "unexpected end of data":
                raise ValueError(f"draft tokens of {inventory.name!r} decode to invalid UTF-8") from error
    if pending:
        chunks.append(pending.decode("utf-8", errors="replace"))
    return [chunk for chunk in chunks if chunk]


def _boundaries(ids: Sequence[int], inventory: VocabularyInventory) -> set[int]:
    """Byte offsets where each token of `ids` ends."""
    offsets, position = set(), 0
    for token in ids:
        position += len(inventory.contents[token])
        offsets.add(position)
    return offsets


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(chunks: Sequence[str], tokenizer, inventory: VocabularyInventory, window: int,
            revise: bool) -> tuple[list[int], int]:
    """Encode `chunks` one after another with a look-behind window (see ``ReencodingStatistics``).

    Returns:
        (ids, window_changes).
    """
    streamed: list[int] = []
    window_changes = 0
    for chunk in chunks:
        tail = streamed[len(streamed) - window:] if window else []
        tail_text = inventory.content_of(tail).decode("utf-8", errors="replace")
        ids = _encode(tokenizer, tail_text + chunk)
        if revise:
            del streamed[len(streamed) - len(tail):]
            streamed.extend(ids)
        elif ids[:len(tail)] == tail:
            streamed.extend(ids[len(tail):])
        else:
            window_changes += 1
            streamed.extend(_encode(tokenizer, chunk))
    return streamed, window_changes


def reencoding_statistics(
    texts: Iterable[str],
    draft_tokenizer,
    target_tokenizer,
    lookbehinds: Sequence[int] = LOOKBEHIND_WINDOWS,
    chunk_size: int = 4,
) -> list[ReencodingStatistics]:
    """Measure how re-encoding draft text with the target tokenizer moves token boundaries.

    Each text is encoded with the draft tokenizer and streamed to the target tokenizer in
    chunks of `chunk_size` draft tokens, as drafting rounds would produce it, once per window
    and per way of streaming (see ``ReencodingStatistics``).

    Args:
        texts: real text, e.g. benchmark prompts and references.
        draft_tokenizer, target_tokenizer: Hugging Face tokenizers.
        lookbehinds: windows to compare, in target tokens; 0 encodes each chunk on its own.
        chunk_size: draft tokens per step (num_assistant_tokens).

    Returns:
        One ``ReencodingStatistics`` per window, in the order given.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    if any(window < 0 for window in lookbehinds):
        raise ValueError(f"`lookbehinds` must be >= 0, got {list(lookbehinds)}")
    draft = vocabulary_inventory(draft_tokenizer)
    target = vocabulary_inventory(target_tokenizer)
    fields = [field.name for field in dataclasses.fields(ReencodingStatistics) if field.name != "lookbehind"]
    totals = {window: dict.fromkeys(fields, 0) for window in lookbehinds}
    for text in texts:
        if not text:
            continue
        chunks = _text_chunks(_encode(draft_tokenizer, text), draft, chunk_size)
        canonical = _encode(target_tokenizer, "".join(chunks))
        canonical_boundaries = _boundaries(canonical, target)

        # Does encoding prefix + chunk keep the canonical tokens of the prefix? The prefix's
        # last token may grow with the new text, so only the earlier ones must stay.
        changes, prefix, prefix_ids = 0, "", []
        for chunk in chunks:
            ids = _encode(target_tokenizer, prefix + chunk)
            if ids[:len(prefix_ids) - 1] != prefix_ids[:-1]:
                changes += 1
            prefix, prefix_ids = prefix + chunk, ids

        for window in lookbehinds:
            streamed, window_changes = _stream(chunks, target_tokenizer, target, window, revise=False)
            revised, _ = _stream(chunks, target_tokenizer, target, window, revise=True)
            record = totals[window]
            record["num_texts"] += 1
            record["num_steps"] += len(chunks)
            record["boundary_changes"] += changes
            record["window_changes"] += window_changes
            record["canonical_tokens"] += len(canonical)
            record["streamed_tokens"] += len(streamed)
            record["misplaced_boundaries"] += len(_boundaries(streamed, target) - canonical_boundaries)
            record["exact_texts"] += int(streamed == canonical)
            record["revised_tokens"] += len(revised)
            record["revised_misplaced_boundaries"] += len(_boundaries(revised, target) - canonical_boundaries)
            record["revised_exact_texts"] += int(revised == canonical)
    return [ReencodingStatistics(lookbehind=window, **totals[window]) for window in lookbehinds]


# ----------------------------------------------------------------------------------------------
# Token-level intersection drafting


class IntersectionDrafter(TextReencodingDrafter):
    """Drafts from the shared vocabulary only, so speculative sampling stays lossless (TLI).

    The draft's logits outside the shared vocabulary are set to -inf before temperature,
    top-k and top-p, so its distribution q lives on the shared tokens. Each drafted token is
    mapped to its target id, and q is written into the target's vocabulary (zero elsewhere)
    for ``verify_sampling``. With greedy decoding the drafted token is the argmax of the
    restricted logits, and greedy verification keeps the target's greedy output.

    The draft's own context follows the target's committed text by re-encoding it with the
    draft tokenizer from `lookbehind` tokens back (inherited from ``TextReencodingDrafter``),
    because target tokens outside the shared vocabulary have no draft id. The context changes
    only what the draft proposes, never the output's distribution.
    """

    def __init__(
        self,
        draft: torch.nn.Module,
        draft_tokenizer,
        target_tokenizer,
        sampling: SamplingSettings,
        lookbehind: int = DEFAULT_LOOKBEHIND,
        mapping: VocabularyMapping | None = None,
        min_shared_fraction: float = MIN_VOCABULARY_OVERLAP,
        require_chat_template: bool = True,
    ):
        """Build the drafter.

        Args:
            draft: the draft model.
            draft_tokenizer, target_tokenizer: their tokenizers.
            sampling: decoding settings (the engine overwrites them per generation).
            lookbehind: draft tokens re-encoded before the first changed character.
            mapping: a ready ``VocabularyMapping``; built from the tokenizers when None.
            min_shared_fraction, require_chat_template: see ``check_draft_tokenizer``.
        """
        self.comparison = check_draft_tokenizer(draft_tokenizer, target_tokenizer, min_shared_fraction,
                                                require_chat_template)
        super().__init__(draft, draft_tokenizer, target_tokenizer, sampling, lookbehind)
        self.mapping = mapping or VocabularyMapping.build(draft_tokenizer, target_tokenizer)
        draft_vocab_size = draft.get_output_embeddings().weight.shape[0]
        self.suppressed = ~self.mapping.draft_mask(draft_vocab_size).to(self.runner.device)
        draft_ids, target_ids = self.mapping.shared_pairs()
        keep = draft_ids < draft_vocab_size
        self._draft_ids = draft_ids[keep].to(self.runner.device)
        self._target_ids = target_ids[keep].to(self.runner.device)

    def _restricted_pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Pick a draft token from the shared vocabulary; return it and q over the draft vocabulary."""
        logits = logits.masked_fill(self.suppressed, -math.inf)
        return self.sampling.pick(logits)

    def _to_target_probs(self, draft_probs: list[torch.Tensor], target_vocab_size: int) -> torch.Tensor:
        """Move q from draft ids to target ids, shape (k, target_vocab_size)."""
        stacked = torch.stack(draft_probs)
        probs = torch.zeros(stacked.shape[0], target_vocab_size, dtype=stacked.dtype, device=stacked.device)
        inside = self._target_ids < target_vocab_size
        probs[:, self._target_ids[inside]] = stacked[:, self._draft_ids[inside]]
        return probs

    @torch.no_grad()
    def propose(self, target_ids: list[int], max_candidates: int, target_vocab_size: int) -> DraftProposal:
        """Draft up to `max_candidates` shared tokens after `target_ids`, returned as target ids."""
        started = time.perf_counter()
        self.target_text.extend(target_ids[len(self.target_text.ids):])
        self._sync_draft()
        reencode_time = time.perf_counter() - started

        num_tokens = max_candidates
        if self.max_length is not None:
            num_tokens = min(num_tokens, self.max_length - len(self.draft_text.ids))
        if num_tokens <= 0:
            return DraftProposal([], None, 0, 0, 0.0, reencode_time)

        started = time.perf_counter()
        passes_before = self.runner.forward_passes
        context = list(self.draft_text.ids)
        candidates: list[int] = []
        distributions: list[torch.Tensor] = []
        for _ in range(num_tokens):
            token, probs = self._restricted_pick(self.runner.logits_for(context, 1)[0])
            context.append(token)
            candidates.append(int(self.mapping.draft_to_target[token]))
            if probs is not None:
                distributions.append(probs)
            if token in self.stop_ids:
                break
        draft_probs = None
        if not self.sampling.greedy:
            draft_probs = self._to_target_probs(distributions, target_vocab_size)
        return DraftProposal(
            candidate_ids=candidates,
            draft_probs=draft_probs,
            num_draft_tokens=len(candidates),
            forward_passes=self.runner.forward_passes - passes_before,
            draft_time=time.perf_counter() - started,
            reencode_time=reencode_time,
        )


def intersection_speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    target_tokenizer,
    draft_tokenizer,
    mapping: VocabularyMapping | None = None,
    require_chat_template: bool = True,
    **generate_kwargs: Any,
) -> SpeculativeOutput:
    """Run ``speculative_generate`` with an ``IntersectionDrafter``.

    Args:
        target, draft, input_ids: as in ``speculative_generate``.
        target_tokenizer, draft_tokenizer: the two tokenizers.
        mapping: a ready ``VocabularyMapping`` (reuse it across prompts to skip rebuilding).
        require_chat_template: see ``check_draft_tokenizer``.
        **generate_kwargs: other ``speculative_generate`` arguments (num_assistant_tokens,
            max_new_tokens, temperature, top_p, top_k, generator, lookbehind, ...).

    Returns:
        A ``SpeculativeOutput``.
    """
    lookbehind = generate_kwargs.get("lookbehind", DEFAULT_LOOKBEHIND)
    drafter = IntersectionDrafter(draft, draft_tokenizer, target_tokenizer, SamplingSettings(),
                                  lookbehind=lookbehind, mapping=mapping,
                                  require_chat_template=require_chat_template)
    return speculative_generate(target, None, input_ids, target_tokenizer=target_tokenizer,
                                draft_tokenizer=draft_tokenizer, drafter=drafter, **generate_kwargs)


# ----------------------------------------------------------------------------------------------
# MAL of cross-family drafts


@dataclasses.dataclass
class MalRun:
    """One draft, one way of drafting and one temperature over a list of prompts.

    Attributes:
        draft: draft name.
        uag_mode: ``text`` or ``intersection``.
        temperature: 0 for greedy decoding.
        num_assistant_tokens: K.
        max_new_tokens: token budget per prompt.
        num_prompts: prompts decoded.
        new_tokens: target tokens generated, over all prompts.
        target_forward_passes: verification rounds, over all prompts.
        drafted, accepted: candidate target tokens verified and accepted.
        mal: mean accepted length, ``new_tokens / target_forward_passes``.
        wall_time: seconds spent in generation.
        new_token_ids: the generated ids per prompt.
    """

    draft: str
    uag_mode: str
    temperature: float
    num_assistant_tokens: int
    max_new_tokens: int
    num_prompts: int
    new_tokens: int
    target_forward_passes: int
    drafted: int
    accepted: int
    mal: float
    wall_time: float
    new_token_ids: list[list[int]]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan


def measure_mal(
    target: torch.nn.Module,
    target_tokenizer,
    draft: torch.nn.Module,
    draft_tokenizer,
    prompts: Sequence[Sequence[int]],
    uag_mode: str,
    temperature: float = 0.0,
    num_assistant_tokens: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    draft_name: str = "draft",
    require_chat_template: bool = True,
) -> MalRun:
    """Decode `prompts` with speculative decoding across tokenizers and pool the rounds.

    Args:
        target, target_tokenizer, draft, draft_tokenizer: the pair.
        prompts: prompts in target tokens.
        uag_mode: ``text`` (re-encoding) or ``intersection`` (TLI).
        temperature: 0 for greedy; > 0 samples (seeded by `seed`).
        num_assistant_tokens, max_new_tokens: as in ``speculative_generate``.
        draft_name: name stored in the result.
        require_chat_template: see ``check_draft_tokenizer``.

    Returns:
        A ``MalRun``.
    """
    generator = torch.Generator().manual_seed(seed)
    drafter = None
    if uag_mode == "intersection":
        drafter = IntersectionDrafter(draft, draft_tokenizer, target_tokenizer, SamplingSettings(),
                                      require_chat_template=require_chat_template)
    outputs = []
    for ids in tqdm(prompts, desc=f"{draft_name} {uag_mode} T={temperature}", unit="prompt", leave=False):
        outputs.append(speculative_generate(
            target, draft, list(ids), num_assistant_tokens=num_assistant_tokens, max_new_tokens=max_new_tokens,
            temperature=temperature, target_tokenizer=target_tokenizer, draft_tokenizer=draft_tokenizer,
            generator=generator, drafter=drafter, uag_mode=uag_mode,
        ))
    rounds = [record for output in outputs for record in output.rounds]
    new_tokens = sum(output.num_new_tokens for output in outputs)
    passes = sum(record.target_forward_passes for record in rounds)
    return MalRun(
        draft=draft_name,
        uag_mode=uag_mode,
        temperature=temperature,
        num_assistant_tokens=num_assistant_tokens,
        max_new_tokens=max_new_tokens,
        num_prompts=len(outputs),
        new_tokens=new_tokens,
        target_forward_passes=passes,
        drafted=sum(record.num_drafted for record in rounds),
        accepted=sum(record.num_accepted for record in rounds),
        mal=new_tokens / passes if passes else math.nan,
        wall_time=sum(output.wall_time for output in outputs),
        new_token_ids=[output.new_token_ids for output in outputs],
    )


def evaluate_cross_family(
    target_name: str,
    drafts: Sequence[dict[str, str]],
    prompts: Sequence[Sequence[int]],
    out_dir: str | os.PathLike,
    settings: Sequence[tuple[str, float]] = (("text", 0.0), ("intersection", 0.0), ("text", 1.0),
                                             ("intersection", 1.0)),
    num_assistant_tokens: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    target=None,
) -> list[MalRun]:
    """Measure MAL for each draft and each (uag_mode, temperature), resuming finished runs.

    Each run is written to ``out_dir/<draft>-<mode>-t<temperature>.json``. A file written with
    the same settings, prompts and draft weights is read back instead of decoding again. A
    draft whose path is a missing directory is skipped with a warning.

    Args:
        target_name: target model name.
        drafts: ``[{"name": ..., "path": Hub id or model directory}, ...]``.
        prompts: prompts in target tokens.
        out_dir: folder for the run files.
        settings: (uag_mode, temperature) pairs to run for every draft.
        num_assistant_tokens, max_new_tokens, seed: decoding settings.
        target: a loaded ``(model, tokenizer)`` pair for `target_name`, to skip loading it.

    Returns:
        One ``MalRun`` per draft and setting, in order.
    """
    from .models import EMBEDDED_MODELS, load_model

    out_dir = Path(out_dir)
    prompts_digest = hashlib.sha256(json.dumps([list(ids) for ids in prompts]).encode()).hexdigest()[:16]
    target_model, target_tokenizer = target or load_model(target_name)
    runs: list[MalRun] = []
    for entry in drafts:
        name, path = entry["name"], str(entry["path"])
        if not Path(path).is_dir() and path not in EMBEDDED_MODELS and not _HUB_ID.fullmatch(path):
            logger.warning("Skipping draft %s: %s does not exist (run the stage that builds it)", name, path)
            continue
        draft_model = draft_tokenizer = None
        # The weights' hash detects a rebuilt draft directory, whose stored runs are stale.
        weights = weights_fingerprint(path)
        for uag_mode, temperature in settings:
            record = {"target": target_name, "draft_path": path, "draft_weights": weights,
                      "prompts": prompts_digest, "seed": seed}
            result_path = out_dir / f"{name}-{uag_mode}-t{temperature:g}.json"
            stored = read_json(result_path)
            if stored and stored.get("record") == record and stored["run"]["max_new_tokens"] == max_new_tokens \
                    and stored["run"]["num_assistant_tokens"] == num_assistant_tokens:
                runs.append(MalRun(**stored["run"]))
                logger.info("%s: finished earlier, read back", result_path.name)
                continue
            if draft_model is None:
                draft_model, draft_tokenizer = load_model(path)
            run = measure_mal(target_model, target_tokenizer, draft_model, draft_tokenizer, prompts, uag_mode,
                              temperature, num_assistant_tokens, max_new_tokens, seed, name)
            logger.info("%s %s T=%g: MAL %.3f over %d prompts (%.0f s)", name, uag_mode, temperature,
                        run.mal, run.num_prompts, run.wall_time)
            atomic_write_json(result_path, {"record": record, "run": dataclasses.asdict(run)})
            runs.append(run)
        del draft_model
    return runs
