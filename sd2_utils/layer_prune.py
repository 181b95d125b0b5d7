"""Layer pruning, SD²'s equal-MACs baseline: drop whole decoder layers; ``sd2 layer-prune``.

Two ways to choose the layers, both measured on calibration samples:

- ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
  arXiv 2403.17887): for a block of ``n`` contiguous layers starting at layer ``l``, the angular
  distance ``arccos(cos(x_l, x_{l+n})) / pi`` between the last token's representation entering
  layer ``l`` and leaving layer ``l + n - 1``, averaged over samples. The block with the
  smallest distance is removed.
- ``block_influence`` (Men et al. 2024, "ShortGPT", arXiv 2403.03853): per layer
  ``1 - cos(x_in, x_out)`` averaged over all tokens; the ``n`` layers with the lowest influence
  are removed (not necessarily contiguous).

Removing layers renumbers the rest: ``config.num_hidden_layers``, ``config.layer_types`` and
every ``layer_idx`` attribute (the KV cache slot of each attention module) are updated, so the
saved draft loads with ``from_pretrained`` and generates with a KV cache.

``--match-macs DIR`` picks ``n`` so that the layer-pruned draft's MACs per token (counted from
nonzero weights by ``sd2_utils.metrics.count_macs``) come closest to those of a sparse draft.
The record ``layer_pruning.json`` in the output folder stores the choice and the measurements.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import adapter
from .io import read_json

logger = logging.getLogger(__name__)

METHODS = ("angular", "block_influence")
RECORD_NAME = "layer_pruning.json"


@torch.no_grad()
def measure_layers(model: nn.Module, samples: Sequence[torch.Tensor], show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the calibration samples layer by layer and return what both metrics need.

    Args:
        samples: token ids, each ``[seq_len]``.

    Returns:
        ``last_token``: float ``[num_samples, num_layers + 1, hidden_size]``, the last token's
        hidden state entering each layer (index ``num_layers``: leaving the last layer);
        ``block_influence``: float ``[num_layers]``, ``1 - cos(input, output)`` of each layer,
        averaged over all tokens of all samples.
    """
    if not samples:
        raise ValueError("empty calibration set: layer pruning needs at least one sample")
    layers = adapter.decoder_layers(model)
    hidden, layer_kwargs = adapter.capture_layer_inputs(model, samples)
    last_token = torch.zeros(len(samples), len(layers) + 1, hidden[0].shape[-1])
    influence_sum = torch.zeros(len(layers), dtype=torch.float64)
    num_tokens = 0
    for sample_index in tqdm(range(len(samples)), desc="layer metrics", disable=not show_progress):
        states = hidden[sample_index]
        last_token[sample_index, 0] = states[0, -1].float()
        for index, layer in enumerate(layers):
            output = adapter.run_layer(layer, states, layer_kwargs[sample_index][index])
            cosine = torch.nn.functional.cosine_similarity(states[0].float(), output[0].float(), dim=-1)
            influence_sum[index] += float((1.0 - cosine).sum())
            last_token[sample_index, index + 1] = output[0, -1].float()
            states = output
        num_tokens += states.shape[1]
        hidden[sample_index] = None  # Release each sample's states once its layers have run.
    return {"last_token": last_token, "block_influence": (influence_sum / num_tokens).float()}


def angular_distance_map(last_token: torch.Tensor) -> torch.Tensor:
    """Return the mean angular distance for every block of contiguous layers.

    Args:
        last_token: ``[num_samples, num_layers + 1, hidden_size]`` from ``measure_layers``.

    Returns:
        ``[num_layers, num_layers]``: entry ``[n - 1, l]`` is the distance between the input of
        layer ``l`` and the output of layer ``l + n - 1``, in [0, 1]; NaN where ``l + n`` exceeds
        the number of layers.
    """
    num_layers = last_token.shape[1] - 1
    normalized = torch.nn.functional.normalize(last_token.double(), dim=-1)
    distances = torch.full((num_layers, num_layers), float("nan"))
    for n in range(1, num_layers + 1):
        cosine = (normalized[:, : num_layers + 1 - n] * normalized[:, n:]).sum(dim=-1)  # [samples, starts]
        angle = torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi
        distances[n - 1, : num_layers + 1 - n] = angle.mean(dim=0).float()
    return distances


def select_layers(method: str, num_layers_to_remove: int, measurements: dict[str, torch.Tensor]) -> list[int]:
    """Return the sorted indices of the layers to remove.

    Raises:
        ValueError: an unknown method, or `num_layers_to_remove` outside ``[0, num_layers)``.
    """
    num_layers = measurements["block_influence"].shape[0]
    if not 0 <= num_layers_to_remove < num_layers:
        raise ValueError(
            f"invalid number of layers to remove {num_layers_to_remove}: the model has "
            f"{num_layers} decoder layers, so pass 0 to {num_layers - 1}"
        )
    if num_layers_to_remove == 0:
        return []
    if method == "angular":
        distances = angular_distance_map(measurements["last_token"])[num_layers_to_remove - 1]
        start = int(torch.argmin(distances[: num_layers - num_layers_to_remove + 1]))
        return list(range(start, start + num_layers_to_remove))
    if method == "block_influence":
        order = torch.argsort(measurements["block_influence"])
        return sorted(int(index) for index in order[:num_layers_to_remove])
    raise ValueError(f"invalid layer-pruning method {method!r}: use one of {', '.join(METHODS)}")


def remove_layers(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Delete decoder layers in place and renumber the rest; return `model`."""
    layers = adapter.decoder_layers(model)
    removed = set(int(index) for index in indices)
    invalid = sorted(index for index in removed if not 0 <= index < len(layers))
    if invalid:
        raise ValueError(f"invalid layer indices {invalid}: the model has layers 0 to {len(layers) - 1}")
    keep = [index for index in range(len(layers)) if index not in removed]
    kept_layers = [layers[index] for index in keep]
    for new_index, layer in enumerate(kept_layers):
        for module in layer.modules():
            # The attention module's layer_idx selects its KV cache slot.
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    adapter.replace_decoder_layers(model, kept_layers)
    config = adapter.text_config(model)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[index] for index in keep]
    return model


def _layer_macs(model: nn.Module) -> tuple[int, list[int]]:
    """Return the model's MACs per token and the linear MACs of each decoder layer."""
    from .metrics import count_macs

    macs = count_macs(model)
    prefix, layers = adapter.find_decoder_layers(model)
    per_layer = [0] * len(layers)
    for name, value in macs.linear.items():
        if name.startswith(prefix + "."):
            per_layer[int(name[len(prefix) + 1:].split(".")[0])] += value
    return macs.total, per_layer


def layers_to_match_macs(model: nn.Module, target_macs: int, method: str, measurements: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Pick how many layers to remove so the MACs per token come closest to `target_macs`.

    Returns:
        (number of layers to remove, MACs per token after removing them).
    """
    total, per_layer = _layer_macs(model)
    best = None
    for n in range(len(per_layer)):
        macs = total - sum(per_layer[index] for index in select_layers(method, n, measurements))
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (n, macs)
    return best


def sparse_draft_macs(directory: str | os.PathLike) -> int:
    """Return the MACs per token of a (sparse) draft folder, counting nonzero weights."""
    from transformers import AutoModelForCausalLM

    from .metrics import count_macs

    if not Path(directory).is_dir():
        raise FileNotFoundError(f"--match-macs folder {str(directory)!r} not found; prune the sparse draft first")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return count_macs(model).total


def layer_prune_draft(
    model_name: str,
    out: str | os.PathLike,
    method: str = "angular",
    num_layers: int | None = None,
    match_macs: str | os.PathLike | None = None,
    calibration: str | os.PathLike = "sharegpt",
    num_calibration_samples: int = 32,
    max_seq_length: int = 512,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Remove decoder layers from a draft and save it; return the record.

    Exactly one of `num_layers` (layers to remove) and `match_macs` (a sparse draft folder whose
    MACs per token to match) must be given. A finished folder is reused unless `overwrite`.
    """
    from .calibration import build_calibration
    from .models import load_model
    from .prune import library_versions, save_draft_atomically

    if method not in METHODS:
        raise ValueError(f"invalid layer-pruning method {method!r}: use one of {', '.join(METHODS)}")
    if (num_layers is None) == (match_macs is None):
        raise ValueError("pass exactly one of --num-layers (layers to remove) and --match-macs (a sparse draft folder)")
    out = Path(out)
    if (out / RECORD_NAME).is_file() and not overwrite:
        logger.info("Reusing the layer-pruned draft at %s (pass overwrite to prune again)", out)
        return read_json(out / RECORD_NAME)

    started = time.perf_counter()
    target_macs = sparse_draft_macs(match_macs) if match_macs is not None else None
    model, tokenizer = load_model(model_name, dtype="float32")
    num_layers_before = len(adapter.decoder_layers(model))
    samples, _, calibration_record = build_calibration(calibration, tokenizer, num_calibration_samples, max_seq_length)
    measurements = measure_layers(model, samples)
    dense_macs = _layer_macs(model)[0]
    if target_macs is not None:
        num_layers, predicted = layers_to_match_macs(model, target_macs, method, measurements)
        logger.info("Removing %d layers gives %d MACs per token, closest to the sparse draft's %d",
                    num_layers, predicted, target_macs)
    removed = select_layers(method, num_layers, measurements)
    remove_layers(model, removed)
    macs = _layer_macs(model)[0]
    record = {
        "base_model": str(model_name),
        "method": method,
        "num_layers_before": num_layers_before,
        "removed_layers": removed,
        "num_layers_after": num_layers_before - len(removed),
        "macs_per_token": {"dense": dense_macs, "layer_pruned": macs, "target": target_macs},
        "match_macs": str(match_macs) if match_macs is not None else None,
        "angular_distance": [[None if math.isnan(value) else round(value, 6) for value in row]
                             for row in angular_distance_map(measurements["last_token"]).tolist()],
        "block_influence": [round(value, 6) for value in measurements["block_influence"].tolist()],
        "calibration": calibration_record,
        "versions": library_versions(),
        "seconds": round(time.perf_counter() - started, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_draft_atomically(model, tokenizer, out, {RECORD_NAME: record})
    logger.info("Saved the layer-pruned draft (%d of %d layers, removed %s) to %s",
                record["num_layers_after"], num_layers_before, removed, out)
    return record


def _layer_prune_command(args: argparse.Namespace) -> int:
    record = layer_prune_draft(
        args.model, args.out, method=args.method.replace("-", "_"), num_layers=args.num_layers,
        match_macs=args.match_macs, calibration=args.calibration,
        num_calibration_samples=args.num_calibration_samples, max_seq_length=args.max_seq_length,
        overwrite=args.overwrite,
    )
    macs = record["macs_per_token"]
    print(f"{args.out}: removed layers {record['removed_layers']} ({record['num_layers_after']} of "
          f"{record['num_layers_before']} left), MACs per token {macs['layer_pruned']:,} "
          f"(dense {macs['dense']:,}" + (f", target {macs['target']:,})" if macs["target"] else ")"))
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "layer-prune", help="remove decoder layers from a draft (the equal-MACs baseline)",
        description="Remove the decoder layers that change the representation least and save the draft.",
    )
    parser.add_argument("--model", required=True, help="Hub id or folder of the dense draft")
    parser.add_argument("--method", choices=("angular", "block-influence", "block_influence"), default="angular",
                        help="angular: contiguous block with the smallest angular distance (Gromov et "
                             "al.); block-influence: lowest 1 - cos per layer (ShortGPT) (default angular)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--num-layers", type=int, help="number of decoder layers to remove")
    group.add_argument("--match-macs", metavar="DIR",
                       help="sparse draft folder: remove as many layers as makes the MACs per token closest to its")
    parser.add_argument("--calibration", default="sharegpt",
                        help="distilled folder or data set name (sharegpt, gsm8k) (default sharegpt)")
    parser.add_argument("--num-calibration-samples", type=int, default=32,
                        help="calibration samples of --max-seq-length tokens (default 32)")
    parser.add_argument("--max-seq-length", type=int, default=512, help="tokens per calibration sample (default 512)")
    parser.add_argument("--overwrite", action="store_true", help="prune again even if --out holds a layer-pruned draft")
    parser.add_argument("--out", required=True, help="folder of the layer-pruned draft")
    parser.set_defaults(func=_layer_prune_command)
