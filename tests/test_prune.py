"""Tests of one-shot pruning (SparseGPT, Wanda, magnitude), masks, manifest and storage.

Most tests prune a 2-layer SmolLM2-135M-Instruct (the real model with its other 28 decoder
layers removed) on a few short ShareGPT samples, to stay within the CI time budget.
"""

import json
import logging
import math

import pytest
import torch
from torch import nn

from sd2_utils import adapter, calibration, prune, sparse_format, sparsity
from sd2_utils.layer_prune import remove_layers
from sd2_utils.models import load_model

SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEPT_LAYERS = 2


def _small_smollm():
    model, tokenizer = load_model(SMOLLM_ID)
    remove_layers(model, range(KEPT_LAYERS, len(adapter.decoder_layers(model))))
    return model, tokenizer


@pytest.fixture(scope="module")
def small_model():
    """(model, state dict, tokenizer, calibration, held-out samples, record) of the small SmolLM2."""
    model, tokenizer = _small_smollm()
    samples, heldout, record = calibration.build_calibration(
        "sharegpt", tokenizer, num_calibration_samples=4, max_seq_length=64,
        num_heldout_samples=2, heldout_max_seq_length=64,
    )
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return model, state, tokenizer, samples, heldout, record


@pytest.fixture(scope="module")
def pruned_runs(small_model):
    """Prune the small model with each method; return {run name: (results, state dict)}."""
    model, state, _, samples, _, _ = small_model
    runs = {}
    for name, method, pattern in [
        ("magnitude", "magnitude", None),
        ("wanda", "wanda", None),
        ("sparsegpt", "sparsegpt", None),
        ("sparsegpt_2of4", "sparsegpt", "2:4"),
    ]:
        model.load_state_dict(state)
        settings = prune.resolve_settings(method, None if pattern else 0.5, pattern)
        results = prune.prune_model(model, samples, settings, show_progress=False)
        runs[name] = (results, {key: value.clone() for key, value in model.state_dict().items()})
    model.load_state_dict(state)
    return runs


def _mean_error(results):
    errors = [entry["reconstruction_error"] for entry in results.values()]
    return sum(errors) / len(errors)


def test_sparsegpt_exact_sparsity(pruned_runs):
    results, state = pruned_runs["sparsegpt"]
    assert len(results) == KEPT_LAYERS * 7
    for name, entry in results.items():
        mask = entry["mask"]
        assert int((~mask).sum()) == round(0.5 * mask.numel()), name
        weight = state[f"{name}.weight"]
        assert bool((weight[~mask] == 0).all()), name


def test_sparsegpt_error_below_magnitude(pruned_runs):
    sparsegpt_results = pruned_runs["sparsegpt"][0]
    magnitude_results = pruned_runs["magnitude"][0]
    assert _mean_error(sparsegpt_results) < 0.5 * _mean_error(magnitude_results)
    for name, entry in sparsegpt_results.items():
        assert entry["reconstruction_error"] < magnitude_results[name]["reconstruction_error"], name


def test_wanda_exact_sparsity_per_row(pruned_runs):
    results, _ = pruned_runs["wanda"]
    for name, entry in results.items():
        pruned_per_row = (~entry["mask"]).sum(dim=1)
        assert bool((pruned_per_row == round(0.5 * entry["mask"].shape[1])).all()), name
    assert _mean_error(results) < _mean_error(pruned_runs["magnitude"][0])


def test_sparsegpt_2of4_masks_verified(pruned_runs):
    results, state = pruned_runs["sparsegpt_2of4"]
    for name, entry in results.items():
        mask = entry["mask"]
        groups = mask.reshape(mask.shape[0], -1, 4).sum(dim=2)
        assert bool((groups == 2).all()), name
        assert sparsity.verify_pattern(state[f"{name}.weight"], (2, 4)), name


def test_pruned_perplexity_order(small_model, pruned_runs):
    model, state, _, _, heldout, _ = small_model
    values = {}
    for name in ("magnitude", "sparsegpt"):
        model.load_state_dict(pruned_runs[name][1])
        values[name] = calibration.perplexity(model, heldout)
    model.load_state_dict(state)
    values["dense"] = calibration.perplexity(model, heldout)
    assert values["dense"] < values["sparsegpt"] < values["magnitude"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_4of8_pattern_each_method(method):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=generator)
    inputs = torch.randn(256, 64, generator=generator)
    hessian = torch.zeros(64, 64)
    sparsity.accumulate_hessian(hessian, inputs, 0)
    if method == "magnitude":
        mask = sparsity.magnitude_mask(weight, 0.5, (4, 8))
    elif method == "wanda":
        mask = sparsity.wanda_mask(weight, torch.diagonal(hessian).sqrt(), 0.5, (4, 8))
    else:
        _, mask, _ = sparsity.sparsegpt(weight, hessian, 0.5, (4, 8), block_size=16)
    assert bool((mask.reshape(16, 8, 8).sum(dim=2) == 4).all())


def test_accumulate_hessian_mean_of_outer_products():
    inputs = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    hessian = torch.zeros(2, 2)
    count = sparsity.accumulate_hessian(hessian, inputs[0], 0)
    count = sparsity.accumulate_hessian(hessian, inputs[1], count)
    flat = inputs.reshape(-1, 2)
    assert count == 6
    torch.testing.assert_close(hessian, flat.t() @ flat / 6)


def test_sparsegpt_cholesky_retry_warns(caplog):
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    # Mean diagonal 0.99: dampening 0.01 leaves the last entry negative, 0.1 makes it positive.
    hessian = torch.diag(torch.tensor([1.0] * 7 + [-0.05]))
    with caplog.at_level(logging.WARNING, logger="sd2_utils.sparsity"):
        _, mask, used = sparsity.sparsegpt(weight, hessian, 0.5, layer_name="layers.3.mlp.up_proj")
    assert used == pytest.approx(0.1)
    assert "layers.3.mlp.up_proj" in caplog.text
    assert "dampening_frac=0.1" in caplog.text
    assert int((~mask).sum()) == 16


def test_sparsegpt_cholesky_failure_raises():
    hessian = torch.full((8, 8), float("nan"))
    with pytest.raises(sparsity.CholeskyError, match="Cholesky factorisation of the Hessian of q_proj failed"):
        sparsity.sparsegpt(torch.randn(4, 8), hessian, 0.5, layer_name="q_proj")


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_resolve_settings_invalid_sparsity(value):
    with pytest.raises(ValueError, match=r"invalid sparsity .*: it must be a fraction of pruned weights in \[0, 1\)"):
        prune.resolve_settings("sparsegpt", value)


@pytest.mark.parametrize("pattern", ["4:4", "3:2", "0:4", "2-4"])
def test_resolve_settings_invalid_pattern(pattern):
    with pytest.raises(ValueError, match="invalid N:M pattern"):
        prune.resolve_settings("sparsegpt", None, pattern)


def test_resolve_settings_pattern_contradicts_sparsity():
    with pytest.raises(ValueError, match="sparsity 0.7 contradicts pattern 2:4"):
        prune.resolve_settings("sparsegpt", 0.7, "2:4")


def test_prune_model_pattern_not_dividing_features(small_model):
    model, _, _, samples, _, _ = small_model
    settings = prune.resolve_settings("magnitude", None, "3:5")
    with pytest.raises(ValueError, match="in_features=576 is not divisible by M=5"):
        prune.prune_model(model, samples, settings, show_progress=False)


def test_prune_model_no_decoder_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no decoder layers found in Sequential"):
        prune.prune_model(model, [torch.tensor([1, 2])], prune.resolve_settings("magnitude", 0.5), show_progress=False)


def test_prune_model_empty_calibration(small_model):
    model = small_model[0]
    with pytest.raises(ValueError, match="empty calibration set: got 0 calibration samples"):
        prune.prune_model(model, [], prune.resolve_settings("sparsegpt", 0.5), show_progress=False)
    with pytest.raises(ValueError, match="empty calibration set: method 'wanda' needs calibration"):
        prune.prune_model(model, None, prune.resolve_settings("wanda", 0.5), show_progress=False)


def test_build_calibration_rejects_bad_sources(tmp_path, small_model):
    tokenizer = small_model[2]
    with pytest.raises(ValueError, match="invalid calibration source 'imagenet'"):
        calibration.build_calibration("imagenet", tokenizer, 2, 16)
    with pytest.raises(FileNotFoundError, match="calibration folder .*missing.* not found"):
        calibration.build_calibration(str(tmp_path / "missing"), tokenizer, 2, 16)
    with pytest.raises(ValueError, match="empty calibration set: num_calibration_samples=0"):
        calibration.build_calibration("sharegpt", tokenizer, 0, 16)


def test_calibration_record_fingerprint(small_model):
    _, _, tokenizer, samples, heldout, record = small_model
    assert record["fingerprint"] == calibration.fingerprint(samples)
    assert record["num_tokens"] == 4 * 64
    assert all(sample.shape == (64,) for sample in samples + heldout)
    assert record["chat_template"] is True
    # Calibration comes from the first conversations, held-out samples from the last ones.
    assert not any(torch.equal(a, b) for a in samples for b in heldout)


@pytest.fixture(scope="module")
def pruned_draft_dir(tmp_path_factory, small_model):
    """Run `sd2 prune` on the saved small model, with the compressed copy."""
    from sd2_utils.cli import main

    model, state, tokenizer, _, _, _ = small_model
    model.load_state_dict(state)
    root = tmp_path_factory.mktemp("prune")
    model.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    status = main([
        "prune", "--model", str(root / "dense"), "--method", "sparsegpt", "--sparsity", "0.5",
        "--calibration", "sharegpt", "--num-calibration-samples", "2", "--max-seq-length", "32",
        "--out", str(root / "sparse"), "--compressed-out", str(root / "compressed"),
    ])
    assert status == 0
    return root


def test_prune_cli_manifest_fields(pruned_draft_dir):
    manifest = prune.load_sparsity_manifest(pruned_draft_dir / "sparse")
    assert manifest["method"] == "sparsegpt"
    assert manifest["sparsity"] == 0.5
    assert manifest["pattern"] is None
    assert manifest["mask_granularity"] == "layer"
    assert manifest["block_size"] == 128
    assert manifest["dampening_frac"] == 0.01
    assert manifest["overall_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert len(manifest["pruned_layers"]) == KEPT_LAYERS * 7
    assert manifest["calibration"]["num_calibration_samples"] == 2
    assert len(manifest["calibration"]["fingerprint"]) == 64
    assert set(manifest["versions"]) >= {"torch", "transformers", "python"}
    entry = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert entry["shape"] == [576, 1536]
    assert 0 < entry["reconstruction_error"] < 1


def test_prune_cli_draft_loads_with_from_pretrained(pruned_draft_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned_draft_dir / "sparse")
    manifest = prune.load_sparsity_manifest(pruned_draft_dir / "sparse")
    current = prune.compute_masks(model, manifest)
    recorded = prune.load_masks(pruned_draft_dir / "sparse")
    assert set(current) == set(manifest["pruned_layers"])
    for name, mask in recorded.items():
        assert mask.dtype == torch.bool
        # Every weight pruning removed is zero in the saved draft.
        assert not bool((current[name] & ~mask).any()), name
        assert int((~mask).sum()) == mask.numel() // 2, name


def test_prune_cli_reuses_finished_draft(pruned_draft_dir, caplog):
    before = (pruned_draft_dir / "sparse" / prune.MANIFEST_NAME).read_text()
    with caplog.at_level(logging.INFO, logger="sd2_utils.prune"):
        manifest = prune.prune_draft(str(pruned_draft_dir / "dense"), pruned_draft_dir / "sparse",
                                     calibration="sharegpt", num_calibration_samples=2, max_seq_length=32)
    assert "Reusing the pruned draft" in caplog.text
    assert json.loads(before) == manifest


def test_compressed_format_round_trip(pruned_draft_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(pruned_draft_dir / "sparse")
    restored = sparse_format.load_compressed(pruned_draft_dir / "compressed")
    restored_state = restored.state_dict()
    for name, tensor in dense.state_dict().items():
        assert torch.equal(tensor, restored_state[name]), name
    assert restored.lm_head.weight.data_ptr() == restored.get_input_embeddings().weight.data_ptr()


def test_compressed_format_halves_pruned_layers(pruned_draft_dir):
    from safetensors.torch import load_file

    stored = load_file(str(pruned_draft_dir / "compressed" / sparse_format.WEIGHTS_NAME))
    name = "model.layers.0.mlp.down_proj.weight"
    dense_bytes = 576 * 1536 * 4
    compressed_bytes = sum(stored[f"{name}.{part}"].numel() * stored[f"{name}.{part}"].element_size()
                           for part in ("values", "bitmask", "shape"))
    assert compressed_bytes / dense_bytes == pytest.approx(0.5 + 1 / 32, abs=1e-3)


def test_pack_bits_round_trip():
    mask = torch.rand(5, 13, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = sparse_format.pack_bits(mask)
    assert packed.shape == (5, 2)
    assert torch.equal(sparse_format.unpack_bits(packed, 13), mask)


def test_load_compressed_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="sparse_format.json not found"):
        sparse_format.load_compressed(tmp_path)


def test_load_sparsity_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="sparsity_manifest.json not found"):
        prune.load_sparsity_manifest(tmp_path)


def test_reconstruction_error_values():
    weight = torch.tensor([[1.0, 2.0]])
    hessian = torch.eye(2)
    assert sparsity.reconstruction_error(weight, weight, hessian) == 0.0
    assert sparsity.reconstruction_error(weight, torch.tensor([[0.0, 2.0]]), hessian) == pytest.approx(0.2)
    assert math.isclose(sparsity.reconstruction_error(weight, torch.zeros(1, 2), hessian), 1.0)
