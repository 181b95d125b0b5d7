"""Tests of layer pruning: metrics, layer removal with a KV cache, MAC matching, the CLI."""

import math

import pytest
import torch

from sd2_utils import adapter, calibration, layer_prune, prune
from sd2_utils.models import load_model

SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA_ID = "google/gemma-3-270m"
PROMPT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def _greedy(model, input_ids, use_cache: bool, max_new_tokens: int = 10) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                              use_cache=use_cache, pad_token_id=0)


@pytest.fixture(scope="module")
def smollm_measured():
    model, tokenizer = load_model(SMOLLM_ID)
    samples, _, _ = calibration.build_calibration("sharegpt", tokenizer, 2, 32)
    return model, tokenizer, layer_prune.measure_layers(model, samples, show_progress=False)


def test_measure_layers_shapes(smollm_measured):
    _, _, measurements = smollm_measured
    assert measurements["last_token"].shape == (2, 31, 576)
    influence = measurements["block_influence"]
    assert influence.shape == (30,)
    assert bool(((influence >= 0) & (influence <= 2)).all())


def test_angular_distance_map_known_angles():
    # Three boundaries of one sample: x0 = e1, x1 = e2 (90 degrees), x2 = -e1 (180 from x0).
    last_token = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    distances = layer_prune.angular_distance_map(last_token)
    assert distances.shape == (2, 2)
    assert distances[0, 0].item() == pytest.approx(0.5)
    assert distances[0, 1].item() == pytest.approx(0.5)
    assert distances[1, 0].item() == pytest.approx(1.0)
    assert math.isnan(distances[1, 1].item())


def test_select_layers_angular_picks_closest_block():
    # Layers 2 and 3 leave the last token unchanged, so the best 2-layer block starts at 2.
    states = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]
    measurements = {"last_token": torch.tensor([states]), "block_influence": torch.ones(5)}
    assert layer_prune.select_layers("angular", 2, measurements) == [2, 3]


def test_select_layers_block_influence_lowest():
    measurements = {"last_token": torch.zeros(1, 6, 2),
                    "block_influence": torch.tensor([0.5, 0.1, 0.4, 0.05, 0.3])}
    assert layer_prune.select_layers("block_influence", 2, measurements) == [1, 3]


def test_select_layers_invalid_count(smollm_measured):
    with pytest.raises(ValueError, match="invalid number of layers to remove 30: the model has 30"):
        layer_prune.select_layers("angular", 30, smollm_measured[2])


def test_remove_layers_fixes_config_and_indices():
    model, _ = load_model(SMOLLM_ID)
    layer_prune.remove_layers(model, [3, 4, 5, 6])
    layers = adapter.decoder_layers(model)
    assert len(layers) == 26
    assert model.config.num_hidden_layers == 26
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(26))


def test_layer_pruned_generates_same_with_and_without_cache(smollm_measured):
    model, tokenizer, measurements = smollm_measured
    removed = layer_prune.select_layers("angular", 6, measurements)
    layer_prune.remove_layers(model, removed)
    input_ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
    with_cache = _greedy(model, input_ids, use_cache=True)
    without_cache = _greedy(model, input_ids, use_cache=False)
    assert with_cache.shape[1] == input_ids.shape[1] + 10
    assert torch.equal(with_cache, without_cache)


def test_gemma3_layer_removal_keeps_layer_types():
    model, tokenizer = load_model(GEMMA_ID)
    types_before = list(model.config.layer_types)
    layer_prune.remove_layers(model, [1, 5, 6])
    expected = [kind for index, kind in enumerate(types_before) if index not in (1, 5, 6)]
    assert model.config.layer_types == expected
    assert model.config.num_hidden_layers == len(types_before) - 3
    input_ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    assert torch.equal(_greedy(model, input_ids, True, 8), _greedy(model, input_ids, False, 8))


@pytest.fixture(scope="module")
def small_sparse_pair(tmp_path_factory):
    """A 6-layer SmolLM2 saved dense, and its 50% magnitude-pruned copy."""
    model, tokenizer = load_model(SMOLLM_ID)
    layer_prune.remove_layers(model, range(6, 30))
    root = tmp_path_factory.mktemp("layer_prune")
    model.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    prune.prune_draft(str(root / "dense"), root / "sparse", method="magnitude", sparsity=0.5, calibration=None)
    return root


def test_layers_to_match_macs_about_half(small_sparse_pair):
    from sd2_utils.metrics import count_macs
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(small_sparse_pair / "dense")
    target = layer_prune.sparse_draft_macs(small_sparse_pair / "sparse")
    measurements = {"last_token": torch.randn(1, 7, 576), "block_influence": torch.rand(6)}
    removed, macs = layer_prune.layers_to_match_macs(dense, target, "block_influence", measurements)
    assert removed == 3
    assert macs < count_macs(dense).total
    assert abs(macs - target) / target < 0.05


def test_layer_prune_cli_match_macs(small_sparse_pair):
    from sd2_utils.cli import main
    from transformers import AutoModelForCausalLM

    out = small_sparse_pair / "layer_pruned"
    status = main([
        "layer-prune", "--model", str(small_sparse_pair / "dense"), "--match-macs",
        str(small_sparse_pair / "sparse"), "--calibration", "sharegpt",
        "--num-calibration-samples", "2", "--max-seq-length", "16", "--out", str(out),
    ])
    assert status == 0
    record = layer_prune.read_json(out / layer_prune.RECORD_NAME)
    assert record["num_layers_before"] == 6
    assert len(record["removed_layers"]) == 3
    assert record["removed_layers"] == list(range(record["removed_layers"][0], record["removed_layers"][0] + 3))
    assert len(record["angular_distance"]) == 6
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 3
    input_ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(_greedy(reloaded, input_ids, True, 6), _greedy(reloaded, input_ids, False, 6))


def test_layer_prune_draft_needs_one_size_option(tmp_path):
    with pytest.raises(ValueError, match="pass exactly one of --num-layers"):
        layer_prune.layer_prune_draft(SMOLLM_ID, tmp_path / "out")
    with pytest.raises(ValueError, match="invalid layer-pruning method 'random'"):
        layer_prune.layer_prune_draft(SMOLLM_ID, tmp_path / "out", method="random", num_layers=2)


def test_sparse_draft_macs_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="--match-macs folder .* not found"):
        layer_prune.sparse_draft_macs(tmp_path / "missing")


def test_measure_layers_empty_calibration():
    with pytest.raises(ValueError, match="empty calibration set"):
        layer_prune.measure_layers(torch.nn.Linear(2, 2), [])
