"""Tests for MAL, acceptance and MAC counting."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SMOLLM_ID
from sd2_utils.metrics import (
    acceptance_alpha,
    acceptance_per_position,
    count_macs,
    expected_mal,
    improvement_factor,
    mac_reduction,
    mean_accepted_length,
    mean_accepted_length_without_last,
)
from sd2_utils.models import resolve

# Llama-3.2-3B as its config.json describes it (no weights needed).
LLAMA_32_3B = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
}


def test_count_macs_llama_3b_half_sparse_reduction():
    dense = count_macs(LLAMA_32_3B)
    sparse = count_macs(LLAMA_32_3B, sparsity=0.5)
    assert dense.total == 3_212_574_720
    assert sparse.lm_head == dense.lm_head == 3072 * 128256
    assert round(100 * mac_reduction(dense, sparse), 2) == 43.87


def test_count_macs_accepts_transformers_config():
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_32_3B)
    assert count_macs(config, sparsity=0.5).total == count_macs(LLAMA_32_3B, sparsity=0.5).total


@pytest.fixture(scope="module")
def smollm_eager():
    """SmolLM2-135M with eager attention, so the flop counter sees the attention matmuls."""
    model = AutoModelForCausalLM.from_pretrained(resolve(SMOLLM_ID), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("num_tokens", [1, 6])
def test_count_macs_dense_matches_flop_counter(smollm_eager, num_tokens):
    from torch.utils.flop_counter import FlopCounterMode

    input_ids = torch.arange(1, num_tokens + 1)[None]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        smollm_eager(input_ids)
    # Without a cache, each of the n tokens attends to n keys (the flop counter counts the
    # full score matrix, masked entries included).
    per_token = count_macs(smollm_eager, sparsity=0.0, context_length=num_tokens)
    assert per_token.total * num_tokens == counter.get_total_flops() // 2


def test_count_macs_from_weights_counts_zeros(smollm_eager):
    before = count_macs(smollm_eager)
    layer = smollm_eager.model.layers[0].mlp.down_proj
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight[:, : layer.weight.shape[1] // 2] = 0.0
    try:
        after = count_macs(smollm_eager)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)
    # Before, the layer's few dequantization zeros are incidental, so it counts as dense. After,
    # it is half sparse and counts its remaining non-zero weights.
    remaining_nonzero = int(torch.count_nonzero(saved[:, saved.shape[1] // 2:]))
    assert before.total - after.total == saved.numel() - remaining_nonzero
    assert after.lm_head == before.lm_head
    assert after.source == "weights"


def test_count_macs_counts_incidental_zeros_as_dense(smollm_eager):
    zeros = sum(int((module.weight == 0).sum()) for module in smollm_eager.modules()
                if isinstance(module, torch.nn.Linear))
    assert zeros > 0, "the dequantized GGUF weights should hold some exact zeros"
    assert count_macs(smollm_eager).total == count_macs(smollm_eager, sparsity=0.0).total
    assert count_macs(smollm_eager, min_sparsity=0.0).total < count_macs(smollm_eager).total


def test_count_macs_rejects_invalid_sparsity():
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\), got 1.5"):
        count_macs(LLAMA_32_3B, sparsity=1.5)


def test_count_macs_rejects_incomplete_config():
    with pytest.raises(ValueError, match="configuration is missing `intermediate_size`"):
        count_macs({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10})


def test_mean_accepted_length_pools_rounds():
    answers = [[3, 5, 1], [2, 2]]
    assert mean_accepted_length(answers) == pytest.approx(13 / 5)
    assert mean_accepted_length([4, 2]) == 3.0
    assert mean_accepted_length_without_last(answers) == pytest.approx(10 / 3)
    assert math.isnan(mean_accepted_length_without_last([[5]]))


def test_acceptance_per_position_counts_reached_positions():
    drafted = [4, 4, 2, 4]
    accepted = [4, 1, 2, 0]
    assert acceptance_per_position(drafted, accepted) == [0.75, 2 / 4, 1 / 3, 1 / 3]


def test_acceptance_alpha_and_expected_mal():
    # Rounds: 2 of 4 accepted (3 examined), 4 of 4 (4 examined): alpha = 6 / 7.
    alpha = acceptance_alpha([4, 4], [2, 4])
    assert alpha == pytest.approx(6 / 7)
    assert expected_mal(0.5, 3) == pytest.approx(1.875)
    assert expected_mal(1.0, 3) == 4.0


def test_improvement_factor_formula():
    assert improvement_factor(3.0, 4, 0.25) == pytest.approx(1.5)
