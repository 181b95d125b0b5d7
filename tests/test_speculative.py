"""Tests for the speculative decoding engine: lossless greedy, exact sampling, tokenizer paths."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import QWEN_DRAFT_ID
from sd2_utils.models import resolve
from sd2_utils.speculative import (
    TextReencodingDrafter,
    TokenText,
    logits_to_probs,
    make_drafter,
    SamplingSettings,
    speculative_generate,
    target_generate,
    verify_greedy,
    verify_sampling,
)

MAX_NEW_TOKENS = 16
PROMPTS = {
    "ascii": "Write a Python function that checks whether a number is prime.",
    "non_ascii": "Traduis en français : « Ünïcödé, naïve café, Straße ». Réponds brièvement.",
    "emoji": "Explain in one sentence what 🐍 and 🦀 stand for in programming 😀🚀.",
    "cjk": "用一句话解释什么是递归。",
}


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5-Coder-0.5B-Instruct, the target of these tests, in fp32."""
    from sd2_utils.models import load_model

    return load_model(QWEN_DRAFT_ID)


@pytest.fixture(scope="module")
def qwen_shallow():
    """The first 6 of the 24 layers of the same model: a weak draft with the same tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(resolve(QWEN_DRAFT_ID), num_hidden_layers=6, dtype=torch.float32)
    return model.eval()


def _prompt_ids(tokenizer, text):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


@pytest.fixture(scope="module")
def references(qwen):
    """The target's own greedy outputs for PROMPTS."""
    model, tokenizer = qwen
    outputs = {}
    for name, text in PROMPTS.items():
        ids = _prompt_ids(tokenizer, text)
        outputs[name] = (ids, target_generate(model, ids, MAX_NEW_TOKENS, target_tokenizer=tokenizer))
    return outputs


def test_target_generate_matches_transformers_greedy(qwen, references):
    model, _ = qwen
    ids, reference = references["ascii"]
    expected = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert reference.new_token_ids == expected[0, len(ids):].tolist()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_shared_tokenizer_matches_target(qwen, qwen_shallow, references, name):
    model, tokenizer = qwen
    ids, reference = references[name]
    output = speculative_generate(model, qwen_shallow, ids, num_assistant_tokens=3, max_new_tokens=MAX_NEW_TOKENS,
                                  target_tokenizer=tokenizer, draft_tokenizer=tokenizer)
    assert output.new_token_ids == reference.new_token_ids
    assert sum(r.num_emitted for r in output.rounds) == output.num_new_tokens
    assert all(r.num_accepted <= r.num_drafted <= 3 for r in output.rounds)
    assert all(r.target_forward_passes == 1 for r in output.rounds)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_different_tokenizers_matches_target(qwen, smollm, references, name):
    model, tokenizer = qwen
    draft, draft_tokenizer = smollm
    ids, reference = references[name]
    output = speculative_generate(model, draft, ids, num_assistant_tokens=3, max_new_tokens=MAX_NEW_TOKENS,
                                  target_tokenizer=tokenizer, draft_tokenizer=draft_tokenizer)
    assert output.new_token_ids == reference.new_token_ids
    assert output.mean_accepted_length >= 1.0
    assert sum(r.num_emitted for r in output.rounds) == output.num_new_tokens


def test_different_tokenizers_use_text_reencoding(qwen, smollm):
    drafter = make_drafter(smollm[0], SamplingSettings(), {0}, qwen[1], smollm[1])
    assert isinstance(drafter, TextReencodingDrafter)


def test_greedy_prompt_near_context_limit(qwen, smollm, qwen_shallow, references):
    model, tokenizer = qwen
    ids, reference = references["ascii"]
    saved = model.config.max_position_embeddings
    model.config.max_position_embeddings = len(ids) + 5
    try:
        shared = speculative_generate(model, qwen_shallow, ids, 4, MAX_NEW_TOKENS)
        different = speculative_generate(model, smollm[0], ids, 4, MAX_NEW_TOKENS,
                                         target_tokenizer=tokenizer, draft_tokenizer=smollm[1])
    finally:
        model.config.max_position_embeddings = saved
    for output in (shared, different):
        assert output.stop_reason == "max_length"
        assert output.new_token_ids == reference.new_token_ids[:5]


def test_greedy_eos_inside_drafted_block(qwen):
    model, tokenizer = qwen
    ids = _prompt_ids(tokenizer, "Reply with the single word yes and nothing else.")
    reference = target_generate(model, ids, 16, target_tokenizer=tokenizer)
    # The target drafting for itself accepts every token, so EOS lands inside a drafted block.
    output = speculative_generate(model, model, ids, num_assistant_tokens=8, max_new_tokens=16,
                                  target_tokenizer=tokenizer, draft_tokenizer=tokenizer)
    assert reference.stop_reason == "eos"
    assert output.stop_reason == "eos"
    assert output.new_token_ids == reference.new_token_ids
    assert output.new_token_ids[-1] == tokenizer.eos_token_id
    assert output.rounds[-1].num_accepted == output.rounds[-1].num_emitted


def test_speculative_rejects_k_below_one(qwen, qwen_shallow):
    with pytest.raises(ValueError, match=r"`num_assistant_tokens` \(K\) must be an integer >= 1, got 0"):
        speculative_generate(qwen[0], qwen_shallow, [1, 2, 3], num_assistant_tokens=0)


def test_draft_with_unrelated_vocabulary_raises(qwen, smollm):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"⟦zq{index}⟧": index + 1 for index in range(200)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    unrelated = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"shares only 0\.\d% of its token texts"):
        speculative_generate(qwen[0], smollm[0], [1, 2, 3], target_tokenizer=qwen[1], draft_tokenizer=unrelated)


@pytest.mark.parametrize("text", [PROMPTS["emoji"], PROMPTS["cjk"], PROMPTS["non_ascii"], "  two  spaces\n\ttab"])
def test_token_text_matches_full_decode(qwen, smollm, text):
    for tokenizer in (qwen[1], smollm[1]):
        ids = tokenizer.encode(text, add_special_tokens=False)
        tracker = TokenText(tokenizer, ids)
        assert tracker.text == tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        for boundary in range(len(ids) + 1):
            if tracker.is_clean(boundary):
                assert tracker.text[: tracker.text_end(boundary)] == tokenizer.decode(
                    ids[:boundary], clean_up_tokenization_spaces=False)


def test_verify_greedy_accepts_matching_prefix():
    logits = torch.full((4, 6), -1.0)
    for row, token in enumerate([2, 5, 1, 3]):
        logits[row, token] = 1.0
    assert verify_greedy([2, 5, 0], logits) == (2, 1)
    assert verify_greedy([2, 5, 1], logits) == (3, 3)
    assert verify_greedy([4], logits[:2]) == (0, 2)


def test_logits_to_probs_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = logits_to_probs(logits, top_k=2)
    assert torch.allclose(top_k, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    top_p = logits_to_probs(logits, top_p=0.8)
    assert torch.allclose(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    top_p_three = logits_to_probs(logits, top_p=0.81)
    assert torch.allclose(top_p_three, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def _emitted_frequencies(p, q, trials, generator, one_hot_candidates=None):
    """Run verification `trials` times; return frequencies of the first and (given one) second token."""
    vocab = p.shape[1]
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(trials):
        if one_hot_candidates is None:
            candidates = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(q.shape[0])]
            draft_probs = q
        else:
            candidates, draft_probs = one_hot_candidates, None
        accepted, next_token = verify_sampling(candidates, draft_probs, p, generator)
        emitted = candidates[:accepted] + [next_token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    return first / first.sum(), second / second.sum()


def test_verify_sampling_reproduces_target_distribution():
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0], [0.25, 0.05, 0.3, 0.2, 0.2], [0.2] * 5])
    q = torch.tensor([[0.4, 0.1, 0.1, 0.1, 0.3], [0.1, 0.5, 0.1, 0.2, 0.1]])
    first, second = _emitted_frequencies(p, q, 20000, generator)
    # Standard error of a frequency near 0.3 over 20000 draws is 0.0032; 0.015 is about 4.6 of them.
    assert torch.allclose(first, p[0], atol=0.015)
    assert torch.allclose(second, p[1], atol=0.02)
    first_one_hot, _ = _emitted_frequencies(p, q, 20000, generator, one_hot_candidates=[3, 3])
    assert torch.allclose(first_one_hot, p[0], atol=0.015)


def test_verify_sampling_real_model_distribution(qwen, qwen_shallow):
    model, tokenizer = qwen
    ids = _prompt_ids(tokenizer, "Name a colour.")
    with torch.inference_mode():
        target_logits = model(torch.tensor([ids])).logits[0, -1:]
        draft_logits = qwen_shallow(torch.tensor([ids])).logits[0, -1:]
    p = logits_to_probs(target_logits, temperature=1.0, top_k=8)
    q = logits_to_probs(draft_logits, temperature=1.0, top_k=8)
    support = torch.nonzero(p[0] + q[0]).flatten()
    # Restrict to the union of both top-8 sets, which holds all probability mass of p and q.
    p_small = torch.cat([p[:, support], p[:, support]])
    q_small = q[:, support]
    first, _ = _emitted_frequencies(p_small, q_small, 6000, torch.Generator().manual_seed(1))
    assert torch.allclose(first, p_small[0], atol=0.03)


def test_heuristic_schedule_matches_target(qwen, qwen_shallow, references):
    model, tokenizer = qwen
    ids, reference = references["ascii"]
    output = speculative_generate(model, qwen_shallow, ids, num_assistant_tokens=2, max_new_tokens=MAX_NEW_TOKENS,
                                  schedule="heuristic")
    assert output.new_token_ids == reference.new_token_ids
    assert output.rounds[0].num_drafted == 2


@pytest.mark.parametrize("draft_kind", ["shared", "different"])
def test_sampling_reproducible_with_seed(qwen, qwen_shallow, smollm, draft_kind):
    model, tokenizer = qwen
    draft, draft_tokenizer = (qwen_shallow, tokenizer) if draft_kind == "shared" else smollm
    ids = _prompt_ids(tokenizer, PROMPTS["emoji"])
    outputs = [
        speculative_generate(model, draft, ids, num_assistant_tokens=3, max_new_tokens=8, temperature=0.8,
                             top_p=0.9, top_k=50, target_tokenizer=tokenizer, draft_tokenizer=draft_tokenizer,
                             generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert outputs[0].new_token_ids == outputs[1].new_token_ids
    assert 1 <= outputs[0].num_new_tokens <= 8
    assert all(token < len(tokenizer) for token in outputs[0].new_token_ids)
