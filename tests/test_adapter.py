"""Tests of the model adapter on the three families: Llama (SmolLM2), Qwen2 and Gemma3."""

import pytest
import torch
from torch import nn

from sd2_utils import adapter
from sd2_utils.models import load_model

FAMILIES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 30,
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": 24,
    "google/gemma-3-270m": 18,
}
LINEAR_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("model_id", list(FAMILIES))
def test_adapter_layer_by_layer_matches_forward(model_id):
    model, tokenizer = load_model(model_id)
    name, layers = adapter.find_decoder_layers(model)
    assert name == "model.layers"
    assert len(layers) == FAMILIES[model_id]
    assert list(adapter.linear_layers(layers[0])) == LINEAR_NAMES
    assert len(adapter.decoder_linear_layers(model)) == 7 * FAMILIES[model_id]
    assert adapter.lm_head_name(model) == "lm_head"

    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n", return_tensors="pt").input_ids[0]
    hidden, layer_kwargs = adapter.capture_layer_inputs(model, [ids])
    states = hidden[0]
    for index, layer in enumerate(layers):
        states = adapter.run_layer(layer, states, layer_kwargs[0][index])
    with torch.no_grad():
        reference = model(input_ids=ids[None], output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(adapter.final_norm(model)(states), reference, atol=1e-5)
    # The recording hooks are gone: the layers run normally again.
    assert "forward" not in vars(layers[0])


def test_find_decoder_layers_none():
    with pytest.raises(ValueError, match="no decoder layers found in Sequential"):
        adapter.find_decoder_layers(nn.Sequential(nn.Linear(4, 4)))
