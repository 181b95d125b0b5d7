"""Tests for universal assisted generation: vocabulary alignment, re-encoding and TLI drafting."""

import pytest
import torch

from conftest import GEMMA_ID, QWEN_DRAFT_ID
from sd2_utils import uag
from sd2_utils.models import load_tokenizer
from sd2_utils.speculative import (
    CachedModel,
    SamplingSettings,
    logits_to_probs,
    make_drafter,
    speculative_generate,
    target_generate,
    verify_sampling,
)

MAX_NEW_TOKENS = 16
PROMPTS = {
    "ascii": "Write a Python function that checks whether a number is prime.",
    "non_ascii": "Traduis en français : « Ünïcödé, naïve café, Straße ». Réponds brièvement.",
}
# Critical value of the chi-square distribution with 5 degrees of freedom at p = 0.001
# (standard statistical tables).
CHI_SQUARE_5_DF_P001 = 20.515


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5-Coder-0.5B-Instruct, the target of these tests (same tokenizer as the 1.5B)."""
    from sd2_utils.models import load_model

    return load_model(QWEN_DRAFT_ID)


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return load_tokenizer(GEMMA_ID)


def _prompt_ids(tokenizer, text):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


# ----------------------------------------------------------------------------------------------
# Vocabulary alignment


def test_byte_level_decoder_covers_every_byte():
    table = uag.byte_level_decoder()

    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ")
    assert table["Ċ"] == ord("\n")
    assert table["a"] == ord("a")


@pytest.mark.parametrize("which", ["qwen", "smollm", "gemma"])
def test_inventory_bytes_match_single_token_decode(which, qwen, smollm, gemma_tokenizer):
    tokenizer = {"qwen": qwen[1], "smollm": smollm[1], "gemma": gemma_tokenizer}[which]
    inventory = uag.vocabulary_inventory(tokenizer)
    checked = 0
    for token_id in range(0, inventory.size, 211):
        if token_id in inventory.special:
            continue
        try:
            text = inventory.contents[token_id].decode("utf-8")
        except UnicodeDecodeError:
            continue  # A part of a multi-byte character decodes to U+FFFD alone.
        decoded = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert decoded == text, f"token {token_id} ({inventory.tokens[token_id]!r})"
        checked += 1
    assert checked > 100


def test_inventory_reads_byte_fallback_tokens(gemma_tokenizer):
    inventory = uag.vocabulary_inventory(gemma_tokenizer)
    byte_id = gemma_tokenizer.convert_tokens_to_ids("<0x41>")

    assert inventory.scheme == uag.SENTENCEPIECE
    assert inventory.contents[byte_id] == b"A"
    assert byte_id in inventory.byte_fallback
    assert inventory.contents[gemma_tokenizer.convert_tokens_to_ids("▁hello")] == b" hello"


def test_compare_vocabularies_smollm2_and_qwen(qwen, smollm):
    comparison = uag.compare_vocabularies(smollm[1], qwen[1])

    assert comparison.draft_scheme == comparison.target_scheme == uag.BYTE_LEVEL
    assert comparison.draft_size == 49135
    # Both write bytes with the GPT-2 alphabet, so normalizing finds nothing new.
    assert comparison.normalized_shared == comparison.exact_shared == 39234
    assert comparison.shared_fraction_of_draft == pytest.approx(0.7985, abs=1e-3)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(comparison.shared_special)
    assert comparison.same_chat_format is True


def test_compare_vocabularies_normalizes_sentencepiece(qwen, gemma_tokenizer):
    comparison = uag.compare_vocabularies(gemma_tokenizer, qwen[1])

    assert comparison.draft_scheme == uag.SENTENCEPIECE
    assert comparison.exact_shared == 24519
    # Mapping `▁` to a space finds about four times as many shared tokens.
    assert comparison.normalized_shared == 95968
    assert comparison.shared_fraction_of_draft == pytest.approx(0.3752, abs=1e-3)
    assert comparison.draft_has_chat_template is False
    assert comparison.same_chat_format is None


def test_mapping_round_trips_on_shared_part(qwen, smollm):
    draft_tokenizer, target_tokenizer = smollm[1], qwen[1]
    mapping = uag.VocabularyMapping.build(draft_tokenizer, target_tokenizer)
    draft_ids, target_ids = mapping.shared_pairs()

    assert mapping.num_shared == 39234 + 3  # regular tokens plus three special tokens
    assert mapping.to_draft(mapping.to_target(draft_ids.tolist())) == draft_ids.tolist()
    assert mapping.to_target(mapping.to_draft(target_ids.tolist())) == target_ids.tolist()
    draft_inventory = uag.vocabulary_inventory(draft_tokenizer)
    target_inventory = uag.vocabulary_inventory(target_tokenizer)
    for draft_id, target_id in zip(draft_ids.tolist(), target_ids.tolist()):
        assert draft_inventory.contents[draft_id] == target_inventory.contents[target_id]


def test_mapping_is_one_to_one_with_byte_fallback(qwen, gemma_tokenizer):
    mapping = uag.VocabularyMapping.build(gemma_tokenizer, qwen[1])
    _, target_ids = mapping.shared_pairs()
    space_token = gemma_tokenizer.convert_tokens_to_ids("▁")
    space_byte = gemma_tokenizer.convert_tokens_to_ids("<0x20>")

    assert target_ids.unique().numel() == target_ids.numel()
    assert mapping.to_target([space_token]) == [qwen[1].convert_tokens_to_ids("Ġ")]
    # The byte fallback duplicate of the space stays unmapped.
    assert int(mapping.draft_to_target[space_byte]) == -1


def test_mapping_rejects_unmapped_id(qwen, smollm):
    mapping = uag.VocabularyMapping.build(smollm[1], qwen[1])
    unmapped = int(torch.nonzero(mapping.draft_to_target < 0)[0])

    with pytest.raises(ValueError, match=f"draft token id {unmapped} has no counterpart"):
        mapping.to_target([unmapped])


def test_check_draft_tokenizer_rejects_small_overlap(qwen, gemma_tokenizer):
    with pytest.raises(ValueError, match=r"shares 95968 of its 255895 tokens \(37\.5%\).*below `min_shared_fraction` 50\.0%"):
        uag.check_draft_tokenizer(gemma_tokenizer, qwen[1], min_shared_fraction=0.5,
                                  require_chat_template=False)


def test_check_draft_tokenizer_rejects_missing_chat_template(qwen, gemma_tokenizer):
    with pytest.raises(ValueError, match="gemma-3-270m' has no chat template.*require_chat_template=False"):
        uag.check_draft_tokenizer(gemma_tokenizer, qwen[1])

    comparison = uag.check_draft_tokenizer(gemma_tokenizer, qwen[1], require_chat_template=False)
    assert comparison.normalized_shared == 95968


# ----------------------------------------------------------------------------------------------
# Re-encoding diagnostics


def test_reencoding_statistics_on_spec_bench(qwen, smollm):
    from sd2_utils.data import load_spec_bench, sample_per_category

    questions = sample_per_category(load_spec_bench(), per_category=1, seed=0)
    texts = [row["turns"][0]["content"] for row in questions]

    stats = {record.lookbehind: record for record in uag.reencoding_statistics(texts, smollm[1], qwen[1])}

    assert list(stats) == list(uag.LOOKBEHIND_WINDOWS)
    assert {record.num_texts for record in stats.values()} == {13}
    # Boundary changes depend on the text alone, not on the window.
    assert len({record.boundary_changes for record in stats.values()}) == 1
    assert stats[0].boundary_changes > 0
    assert stats[0].window_changes == 0
    # Without a window every chunk boundary is a token boundary, so some are misplaced.
    assert stats[0].misplaced_boundaries > 0
    assert stats[0].revised_misplaced_boundaries == stats[0].misplaced_boundaries
    # Re-encoding a few tokens back and replacing them restores the canonical boundaries.
    assert stats[10].revised_misplaced_boundaries < stats[0].revised_misplaced_boundaries
    assert stats[10].revised_exact_texts > stats[0].revised_exact_texts
    # A misplaced boundary committed earlier stays inside a wider window for more steps, and
    # each re-encoding of the window moves it again.
    assert stats[10].window_changes > stats[1].window_changes > 0


def test_reencoding_statistics_same_tokenizer_large_window_is_exact(qwen):
    tokenizer = qwen[1]
    texts = ["def add(a, b):\n    return a + b\n", "Straße, naïve café: 用一句话解释什么是递归。"]

    stats = uag.reencoding_statistics(texts, tokenizer, tokenizer, lookbehinds=(10,), chunk_size=1)

    assert stats[0].revised_exact_texts == 2
    assert stats[0].revised_misplaced_boundaries == 0


def test_reencoding_statistics_rejects_bad_chunk_size(qwen):
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1, got 0"):
        uag.reencoding_statistics(["x"], qwen[1], qwen[1], chunk_size=0)


# ----------------------------------------------------------------------------------------------
# Token-level intersection drafting


def test_make_drafter_intersection_mode(qwen, smollm):
    sampling = SamplingSettings()

    drafter = make_drafter(smollm[0], sampling, set(), qwen[1], smollm[1], uag_mode="intersection")

    assert isinstance(drafter, uag.IntersectionDrafter)
    with pytest.raises(ValueError, match="invalid `uag_mode` 'tokens'; use one of text, intersection"):
        make_drafter(smollm[0], sampling, set(), qwen[1], smollm[1], uag_mode="tokens")


@pytest.mark.parametrize("name", list(PROMPTS))
def test_intersection_greedy_matches_target_greedy(qwen, smollm, name):
    target, target_tokenizer = qwen
    ids = _prompt_ids(target_tokenizer, PROMPTS[name])
    reference = target_generate(target, ids, MAX_NEW_TOKENS, target_tokenizer=target_tokenizer)

    output = speculative_generate(target, smollm[0], ids, num_assistant_tokens=4, max_new_tokens=MAX_NEW_TOKENS,
                                  target_tokenizer=target_tokenizer, draft_tokenizer=smollm[1],
                                  uag_mode="intersection")

    assert output.new_token_ids == reference.new_token_ids
    assert sum(record.num_accepted for record in output.rounds) > 0


def test_intersection_drafts_only_shared_tokens(qwen, smollm):
    target, target_tokenizer = qwen
    generator = torch.Generator().manual_seed(0)
    drafter = uag.IntersectionDrafter(smollm[0], smollm[1], target_tokenizer, SamplingSettings(1.0, generator=generator))
    ids = _prompt_ids(target_tokenizer, PROMPTS["ascii"])
    vocab_size = target.get_output_embeddings().weight.shape[0]
    drafter.start(ids)

    proposal = drafter.propose(ids, 4, vocab_size)

    shared_targets = torch.zeros(vocab_size, dtype=torch.bool)
    shared_targets[drafter.mapping.shared_pairs()[1]] = True
    assert len(proposal.candidate_ids) == 4
    assert all(shared_targets[token] for token in proposal.candidate_ids)
    assert proposal.draft_probs.shape == (4, vocab_size)
    assert torch.allclose(proposal.draft_probs.sum(dim=-1), torch.ones(4))
    assert float(proposal.draft_probs[:, ~shared_targets].sum().detach()) == 0.0


def test_intersection_sampling_follows_target_distribution(qwen, smollm):
    """First emitted token over 200 TLI rounds against the target's own sampling distribution.

    Each round runs the real drafter (restricted sampling, id mapping, q in the target's
    vocabulary) and the engine's verification. Target logits are computed once per distinct
    candidate, because row 0 depends on the prompt alone.
    """
    target, target_tokenizer = qwen
    settings = SamplingSettings(temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    ids = target_tokenizer.encode("My favourite colour is")
    vocab_size = target.get_output_embeddings().weight.shape[0]
    drafter = uag.IntersectionDrafter(smollm[0], smollm[1], target_tokenizer, settings)
    drafter.start(ids)
    verifier = CachedModel(target)
    target_probs = {}
    counts = torch.zeros(vocab_size)
    num_samples = 200
    with torch.inference_mode():
        for _ in range(num_samples):
            proposal = drafter.propose(ids, 1, vocab_size)
            key = tuple(proposal.candidate_ids)
            if key not in target_probs:
                logits = verifier.logits_for(ids + list(key), len(key) + 1)
                target_probs[key] = logits_to_probs(logits, settings.temperature, settings.top_k)
            num_accepted, next_token = verify_sampling(key, proposal.draft_probs, target_probs[key], settings.generator)
            counts[key[0] if num_accepted else next_token] += 1
        p = logits_to_probs(verifier.logits_for(ids, 1), settings.temperature, settings.top_k)[0]
        q = drafter.propose(ids, 1, vocab_size).draft_probs[0]

    # Buckets: the five most likely target tokens and everything else.
    top = torch.topk(p, 5).indices
    def bucketed(values):
        return torch.cat([values[top], (values.sum() - values[top].sum()).reshape(1)])
    expected, observed, draft_only = bucketed(p), bucketed(counts) / num_samples, bucketed(q)
    chi_square = float(((observed - expected) ** 2 / expected).sum()) * num_samples

    # The draft's own distribution is far from the target's, so a verification that kept
    # the draft's tokens would fail both checks below.
    draft_distance = 0.5 * float((draft_only - expected).abs().sum())
    observed_distance = 0.5 * float((observed - expected).abs().sum())
    assert draft_distance > 0.3, f"draft and target too close to test: {draft_only} vs {expected}"
    assert observed_distance < 0.1, f"observed {observed.tolist()} vs target {expected.tolist()}"
    assert chi_square < CHI_SQUARE_5_DF_P001, f"observed {observed.tolist()} vs target {expected.tolist()}"
