"""One-shot pruning of a draft: SparseGPT, Wanda and magnitude; ``sd2 prune``.

Every ``nn.Linear`` inside the decoder layers is pruned. Embeddings and ``lm_head`` stay dense
unless ``include_lm_head`` is set. Pruning is sequential: calibration inputs are recorded at
the first decoder layer, and after each layer is pruned its outputs (computed with the pruned
weights) become the inputs of the next. So every layer is calibrated on the errors of the
layers before it. Within a layer, each linear layer's Hessian comes from the dense layer's
inputs. The math for one linear layer, and the granularity at which each method's sparsity is
exact, is in ``sd2_utils.sparsity``.

Sparse fine-tuning keeps the mask with ``load_sparsity_manifest(folder)``, ``load_masks(folder)``
(the masks pruning chose) or ``compute_masks(model, manifest)`` (``weight != 0`` now).

A pruned draft folder contains:

- the model in the Hugging Face layout (``config.json``, ``model.safetensors``, tokenizer), so
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads it anywhere;
- ``sparsity_masks.safetensors``: the keep mask of each pruned layer, bit-packed as
  ``sparse_format.pack_bits`` describes (uint8 ``[rows, ceil(columns / 8)]``), under the
  layer's module name. ``load_masks(folder)`` returns them as bool tensors;
- ``sparsity_manifest.json``, whose fields are:

  - ``format_version`` (int, 1);
  - ``base_model`` (str): the dense draft it was pruned from;
  - ``method``: ``sparsegpt``, ``wanda`` or ``magnitude``;
  - ``sparsity`` (float): requested fraction of pruned weights per pruned layer;
  - ``pattern`` (str or null): ``"N:M"`` (keep N of every M consecutive input weights per
    row), null for unstructured;
  - ``mask_granularity``: where the pruned count is exact: ``layer`` (SparseGPT, magnitude),
    ``row`` (Wanda) or ``group`` (any N:M pattern);
  - ``block_size``, ``dampening_frac`` (SparseGPT settings; null for other methods);
  - ``include_lm_head`` (bool);
  - ``pruned_layers`` (list of str): module names of the pruned ``nn.Linear`` layers, the
    keys of the masks. Sparse fine-tuning must keep these weights at zero;
  - ``layers`` (dict): per pruned layer ``shape`` ([rows, columns]), ``sparsity`` (pruned
    fraction of its mask), ``reconstruction_error`` (relative ``||(W - W')X||^2 / ||WX||^2``
    on the calibration inputs, null without calibration), ``dampening_frac`` (value used,
    larger after a Cholesky retry), ``seconds``;
  - ``overall_sparsity`` (float): pruned fraction over all pruned layers;
  - ``calibration`` (dict or null): ``kind`` (``distilled`` or ``dataset``), ``source``,
    ``num_calibration_samples`` (built; fewer than requested when the source runs out),
    ``num_calibration_samples_requested``, ``max_seq_length``, ``num_tokens``,
    ``conversations_used``, ``chat_template`` and ``fingerprint`` (sha256 of the calibration
    token ids);
  - ``versions`` (dict): python, torch, transformers, sd2;
  - ``seconds`` (float, whole run) and ``created`` (UTC ISO 8601 time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import adapter
from .io import atomic_write_json, read_json
from .sparse_format import pack_bits, save_compressed, unpack_bits
from .sparsity import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMPENING_FRAC,
    check_pattern_fits,
    magnitude_mask,
    parse_pattern,
    pattern_sparsity,
    reconstruction_error,
    sparsegpt,
    validate_sparsity,
    verify_pattern,
    wanda_mask,
)

logger = logging.getLogger(__name__)

METHODS = ("sparsegpt", "wanda", "magnitude")
MANIFEST_NAME = "sparsity_manifest.json"
MASKS_NAME = "sparsity_masks.safetensors"
MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """What to prune and how; ``resolve_settings`` validates and builds one."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: tuple[int, int] | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    dampening_frac: float = DEFAULT_DAMPENING_FRAC
    include_lm_head: bool = False

    @property
    def pattern_text(self) -> str | None:
        return f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else None

    @property
    def mask_granularity(self) -> str:
        if self.pattern is not None:
            return "group"
        return "row" if self.method == "wanda" else "layer"


def resolve_settings(
    method: str = "sparsegpt",
    sparsity: float | None = 0.5,
    pattern: str | tuple[int, int] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening_frac: float = DEFAULT_DAMPENING_FRAC,
    include_lm_head: bool = False,
) -> PruneSettings:
    """Validate pruning options. With an N:M pattern the sparsity is ``1 - N/M``.

    Raises:
        ValueError: an unknown method, a sparsity outside [0, 1), an invalid N:M pattern, a
            sparsity that contradicts the pattern, or non-positive `block_size` or negative
            `dampening_frac`.
    """
    if method not in METHODS:
        raise ValueError(f"invalid method {method!r}: use one of {', '.join(METHODS)}")
    parsed = parse_pattern(pattern)
    if parsed is not None:
        implied = pattern_sparsity(parsed)
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise ValueError(
                f"sparsity {sparsity} contradicts pattern {parsed[0]}:{parsed[1]}, which prunes "
                f"{implied:g} of the weights; pass --sparsity {implied:g} or omit it"
            )
        sparsity = implied
    if sparsity is None:
        raise ValueError("sparsity is missing: pass a fraction in [0, 1) or an N:M pattern")
    sparsity = validate_sparsity(sparsity)
    if block_size < 1:
        raise ValueError(f"invalid block_size {block_size}: it must be >= 1 (default 128)")
    if dampening_frac < 0:
        raise ValueError(f"invalid dampening_frac {dampening_frac}: it must be >= 0 (default 0.01)")
    return PruneSettings(method, sparsity, parsed, block_size, dampening_frac, include_lm_head)


# ----------------------------------------------------------------------------------------------
# Pruning one linear layer, and the layer-wise driver


def prune_linear(
    linear: nn.Linear, hessian: torch.Tensor | None, settings: PruneSettings, name: str
) -> dict[str, Any]:
    """Prune one linear layer in place and return its manifest entry (plus ``mask``)."""
    started = time.perf_counter()
    weight = linear.weight.data
    dampening_used = None
    if settings.method == "sparsegpt":
        new_weight, mask, dampening_used = sparsegpt(
            weight, hessian, settings.sparsity, settings.pattern,
            settings.block_size, settings.dampening_frac, layer_name=name,
        )
    else:
        if settings.method == "wanda":
            mask = wanda_mask(weight, torch.diagonal(hessian).clamp(min=0).sqrt(),
                              settings.sparsity, settings.pattern)
        else:
            mask = magnitude_mask(weight, settings.sparsity, settings.pattern)
        new_weight = weight * mask
    error = reconstruction_error(weight, new_weight, hessian) if hessian is not None else None
    linear.weight.data.copy_(new_weight)
    if settings.pattern is not None and not verify_pattern(mask, settings.pattern):
        raise RuntimeError(f"mask of {name} breaks the {settings.pattern_text} pattern")
    return {
        "shape": list(weight.shape),
        "sparsity": 1.0 - float(mask.float().mean()),
        "reconstruction_error": error,
        "dampening_frac": dampening_used,
        "seconds": round(time.perf_counter() - started, 3),
        "mask": mask,
    }


def _hessian_hooks(linears: dict[str, nn.Linear], inputs: dict[str, torch.Tensor]):
    """Register hooks that store each linear layer's input tensor in `inputs` by name."""

    def make_hook(name: str):
        def hook(module, args):
            inputs[name] = args[0]

        return hook

    return [linear.register_forward_pre_hook(make_hook(name)) for name, linear in linears.items()]


def _accumulate(hessians: dict[str, torch.Tensor], counts: dict[str, int], inputs: dict[str, torch.Tensor]) -> None:
    """Add one sample's inputs to each layer's Hessian (mean of ``x x^T`` over tokens).

    Layers fed the same tensor (q, k and v; gate and up) share one ``X^T X`` product.
    """
    products: dict[int, tuple[torch.Tensor, int]] = {}
    for name, tensor in inputs.items():
        key = id(tensor)
        if key not in products:
            flat = tensor.detach().reshape(-1, tensor.shape[-1]).float()  # [tokens, columns]
            products[key] = (flat.t() @ flat, flat.shape[0])
        product, tokens = products[key]
        total = counts[name] + tokens
        hessians[name].mul_(counts[name] / total).add_(product, alpha=1.0 / total)
        counts[name] = total


def _untie_lm_head(model: nn.Module) -> nn.Linear:
    """Give a tied ``lm_head`` its own weight, so pruning it leaves the embeddings dense."""
    head = adapter.lm_head(model)
    if head.weight is adapter.input_embeddings(model).weight:
        logger.warning("lm_head is tied to the input embeddings; untying it so that pruning "
                       "lm_head leaves the embeddings dense (the saved draft grows by one matrix)")
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        adapter.text_config(model).tie_word_embeddings = False
    return head


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration_samples: Sequence[torch.Tensor] | None,
    settings: PruneSettings,
    show_progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Prune the decoder's linear layers of `model` in place, layer by layer.

    Args:
        model: a causal LM (see ``sd2_utils.adapter`` for the supported layouts).
        calibration_samples: token ids, each ``[seq_len]``. Magnitude pruning accepts None
            (no reconstruction errors are then reported); the other methods need samples.
        settings: from ``resolve_settings``.

    Returns:
        per pruned layer (by module name): its manifest entry plus ``mask`` (bool
        ``[rows, columns]``, True where kept).

    Raises:
        ValueError: no decoder layers, an N:M group size that does not divide a layer's
            input features, or an empty calibration set.
    """
    prefix, layers = adapter.find_decoder_layers(model)
    targets = adapter.decoder_linear_layers(model)
    head_name = adapter.lm_head_name(model) if settings.include_lm_head else None
    if settings.include_lm_head and head_name is None:
        raise ValueError("include_lm_head is set but the model has no lm_head (output embeddings)")
    for name, linear in targets.items():
        check_pattern_fits(linear.in_features, settings.pattern, name)
    if head_name is not None:
        check_pattern_fits(adapter.lm_head(model).in_features, settings.pattern, head_name)
    if calibration_samples is not None and len(calibration_samples) == 0:
        raise ValueError("empty calibration set: got 0 calibration samples; pass at least one")
    if calibration_samples is None and settings.method != "magnitude":
        raise ValueError(f"empty calibration set: method {settings.method!r} needs calibration "
                         f"samples; pass some, or use method 'magnitude'")

    results: dict[str, dict[str, Any]] = {}
    if calibration_samples is None:
        for name, linear in tqdm(targets.items(), desc="magnitude", disable=not show_progress):
            results[name] = prune_linear(linear, None, settings, name)
        if head_name is not None:
            results[head_name] = prune_linear(_untie_lm_head(model), None, settings, head_name)
        return results

    hidden, layer_kwargs = adapter.capture_layer_inputs(model, calibration_samples)
    progress = tqdm(range(len(layers)), desc=f"{settings.method} layers", disable=not show_progress)
    for index in progress:
        layer = layers[index]
        linears = adapter.linear_layers(layer)
        hessians = {name: torch.zeros(linear.in_features, linear.in_features) for name, linear in linears.items()}
        counts = {name: 0 for name in linears}
        inputs: dict[str, torch.Tensor] = {}
        handles = _hessian_hooks(linears, inputs)
        try:
            for sample_index, hidden_states in enumerate(hidden):
                inputs.clear()
                adapter.run_layer(layer, hidden_states, layer_kwargs[sample_index][index])
                _accumulate(hessians, counts, inputs)
        finally:
            for handle in handles:
                handle.remove()
        inputs.clear()

        for name, linear in linears.items():
            full_name = f"{prefix}.{index}.{name}"
            entry = prune_linear(linear, hessians.pop(name), settings, full_name)
            results[full_name] = entry
            logger.debug("%s: sparsity %.4f, error %.3e, %.1f s", full_name, entry["sparsity"],
                         entry["reconstruction_error"], entry["seconds"])
        layer_errors = [results[f"{prefix}.{index}.{name}"]["reconstruction_error"] for name in linears]
        progress.set_postfix(mean_error=f"{sum(layer_errors) / len(layer_errors):.2e}")

        # The pruned layer's outputs are the next layer's inputs.
        for sample_index in range(len(hidden)):
            hidden[sample_index] = adapter.run_layer(layer, hidden[sample_index], layer_kwargs[sample_index][index])

    if head_name is not None:
        norm = adapter.final_norm(model)
        head = _untie_lm_head(model)
        hessian = torch.zeros(head.in_features, head.in_features)
        count = 0
        for hidden_states in hidden:
            normed = norm(hidden_states)
            count_before = count
            flat = normed.reshape(-1, normed.shape[-1]).float()
            count = count_before + flat.shape[0]
            hessian.mul_(count_before / count).addmm_(flat.t(), flat, alpha=1.0 / count)
        results[head_name] = prune_linear(head, hessian, settings, head_name)
    return results


# ----------------------------------------------------------------------------------------------
# Manifest and masks


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "sd2"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def build_manifest(
    results: dict[str, dict[str, Any]],
    settings: PruneSettings,
    base_model: str,
    calibration: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """Assemble ``sparsity_manifest.json`` (fields in the module docstring)."""
    layers = {name: {key: value for key, value in entry.items() if key != "mask"}
              for name, entry in results.items()}
    total = sum(entry["shape"][0] * entry["shape"][1] for entry in layers.values())
    pruned = sum(entry["sparsity"] * entry["shape"][0] * entry["shape"][1] for entry in layers.values())
    uses_hessian_settings = settings.method == "sparsegpt"
    return {
        "format_version": MANIFEST_VERSION,
        "base_model": base_model,
        "method": settings.method,
        "sparsity": settings.sparsity,
        "pattern": settings.pattern_text,
        "mask_granularity": settings.mask_granularity,
        "block_size": settings.block_size if uses_hessian_settings else None,
        "dampening_frac": settings.dampening_frac if uses_hessian_settings else None,
        "include_lm_head": settings.include_lm_head,
        "pruned_layers": list(layers),
        "layers": layers,
        "overall_sparsity": pruned / total if total else 0.0,
        "calibration": calibration,
        "versions": library_versions(),
        "seconds": round(seconds, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_sparsity_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``sparsity_manifest.json`` from a pruned draft folder.

    Raises:
        FileNotFoundError: the folder has no manifest (it is not a pruned draft).
    """
    manifest = read_json(Path(directory) / MANIFEST_NAME)
    if manifest is None:
        raise FileNotFoundError(
            f"{Path(directory) / MANIFEST_NAME} not found; prune the draft with `sd2 prune` first"
        )
    return manifest


def compute_masks(model: nn.Module, manifest: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Return the current keep masks of a model's pruned layers: ``weight != 0``.

    Args:
        manifest: selects the layers in ``manifest["pruned_layers"]``; without it, every linear
            layer inside the decoder layers.

    Returns:
        ``{module_name: bool tensor [rows, columns]}``, True where the weight is nonzero.

    A weight that was exactly zero before pruning counts as pruned here; ``load_masks`` returns
    the masks pruning chose.
    """
    names = manifest["pruned_layers"] if manifest is not None else list(adapter.decoder_linear_layers(model))
    modules = dict(model.named_modules())
    masks = {}
    for name in names:
        if name not in modules:
            raise ValueError(f"pruned layer {name!r} from the manifest is not a module of "
                             f"{type(model).__name__}; load the model the manifest belongs to")
        masks[name] = modules[name].weight.detach() != 0
    return masks


def save_masks(results: dict[str, dict[str, Any]], directory: Path) -> Path:
    path = directory / MASKS_NAME
    save_file({name: pack_bits(entry["mask"]) for name, entry in results.items()}, str(path))
    return path


def load_masks(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the keep masks that pruning chose: ``{module_name: bool [rows, columns]}``."""
    directory = Path(directory)
    manifest = load_sparsity_manifest(directory)
    packed = load_file(str(directory / MASKS_NAME))
    return {name: unpack_bits(packed[name], manifest["layers"][name]["shape"][1])
            for name in manifest["pruned_layers"]}


# ----------------------------------------------------------------------------------------------
# The whole stage: load, calibrate, prune, save


def save_draft_atomically(
    model: nn.Module,
    tokenizer,
    out: Path,
    records: dict[str, Any],
    write_extra=None,
) -> Path:
    """Save a draft in the Hugging Face layout with JSON `records`, all or nothing.

    Everything is written into a temporary sibling folder that replaces `out` only when
    complete. The records are written last, so a folder with its record is a finished one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if write_extra is not None:
            write_extra(work)
        for name, record in records.items():
            atomic_write_json(work / name, record)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def prune_draft(
    model_name: str,
    out: str | os.PathLike,
    method: str = "sparsegpt",
    sparsity: float | None = 0.5,
    pattern: str | None = None,
    calibration: str | os.PathLike | None = "sharegpt",
    num_calibration_samples: int = 128,
    max_seq_length: int = 512,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening_frac: float = DEFAULT_DAMPENING_FRAC,
    include_lm_head: bool = False,
    compressed_out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune a draft and save it with its masks and manifest; return the manifest.

    A finished folder (one with a manifest) is reused unless `overwrite` is set. The folder is
    written under a temporary name and renamed when complete, so a crash leaves no folder that
    looks finished.

    Args:
        model_name: Hub id or folder of the dense draft.
        out: folder of the pruned draft.
        calibration: a distilled folder or a data set name (see ``sd2_utils.calibration``);
            None only for magnitude pruning.
        compressed_out: also write the bitmask format (``sd2_utils.sparse_format``) there.
    """
    from .calibration import build_calibration
    from .models import load_model, load_tokenizer

    settings = resolve_settings(method, sparsity, pattern, block_size, dampening_frac, include_lm_head)
    out = Path(out)
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        existing = load_sparsity_manifest(out)
        if _same_run(existing, settings, calibration, num_calibration_samples, max_seq_length):
            logger.info("Reusing the pruned draft at %s (pass overwrite to prune again)", out)
            return existing
        logger.warning("The pruned draft at %s was made with other settings; pruning again", out)
    if calibration is None and settings.method != "magnitude":
        raise ValueError(f"empty calibration set: method {settings.method!r} needs --calibration")

    started = time.perf_counter()
    # Calibration first, so the data set's memory is released before the model is loaded.
    tokenizer = load_tokenizer(model_name)
    samples, record = None, None
    if calibration is not None:
        samples, _, record = build_calibration(calibration, tokenizer, num_calibration_samples, max_seq_length)
    gc.collect()
    model, tokenizer = load_model(model_name, dtype="float32")
    logger.info("Pruning %s with %s to sparsity %g%s", model_name, settings.method, settings.sparsity,
                f" ({settings.pattern_text})" if settings.pattern else "")
    results = prune_model(model, samples, settings)
    manifest = build_manifest(results, settings, str(model_name), record, time.perf_counter() - started)

    save_draft_atomically(model, tokenizer, out, {MANIFEST_NAME: manifest},
                          write_extra=lambda folder: save_masks(results, folder))
    if compressed_out is not None:
        save_compressed(model, compressed_out, tokenizer)
        atomic_write_json(Path(compressed_out) / MANIFEST_NAME, manifest)
    logger.info("Saved the pruned draft to %s: overall sparsity %.4f in %.0f s",
                out, manifest["overall_sparsity"], manifest["seconds"])
    return manifest


def _same_run(manifest: dict[str, Any], settings: PruneSettings, calibration, num_samples: int, max_seq_length: int) -> bool:
    """Return True when a saved manifest was made with these settings and calibration sizes."""
    same_settings = (
        manifest["method"] == settings.method
        and manifest["sparsity"] == settings.sparsity
        and manifest["pattern"] == settings.pattern_text
        and manifest["include_lm_head"] == settings.include_lm_head
    )
    recorded = manifest.get("calibration")
    if calibration is None or recorded is None:
        return same_settings and calibration is None and recorded is None
    return (
        same_settings
        and recorded["max_seq_length"] == max_seq_length
        and recorded.get("num_calibration_samples_requested", recorded["num_calibration_samples"]) == num_samples
        and _same_source(recorded, calibration)
    )


def _same_source(recorded: dict[str, Any], calibration: str | os.PathLike) -> bool:
    if Path(calibration).is_dir():
        return recorded["kind"] == "distilled" and Path(recorded["source"]).resolve() == Path(calibration).resolve()
    # Data set records read e.g. "gsm8k (train)": the first word is the name.
    return recorded["kind"] == "dataset" and str(recorded["source"]).split(" ")[0] == str(calibration)


def _parse_sparsity(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid sparsity {text!r}: pass a number such as 0.5") from None


def _prune_command(args: argparse.Namespace) -> int:
    # --sparsity defaults to None so that a pattern alone implies its sparsity.
    if args.sparsity is None and args.pattern is None:
        args.sparsity = 0.5
    calibration = None if args.calibration in (None, "none") else args.calibration
    manifest = prune_draft(
        args.model, args.out, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        calibration=calibration, num_calibration_samples=args.num_calibration_samples,
        max_seq_length=args.max_seq_length, block_size=args.block_size,
        dampening_frac=args.dampening_frac, include_lm_head=args.include_lm_head,
        compressed_out=args.compressed_out, overwrite=args.overwrite,
    )
    errors = [entry["reconstruction_error"] for entry in manifest["layers"].values()
              if entry["reconstruction_error"] is not None]
    mean_error = f"{sum(errors) / len(errors):.4e}" if errors else "n/a"
    print(f"{args.out}: {manifest['method']} sparsity {manifest['overall_sparsity']:.4f} over "
          f"{len(manifest['pruned_layers'])} layers, mean reconstruction error {mean_error}")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune", help="prune a draft one-shot (SparseGPT, Wanda or magnitude)",
        description="Prune every linear layer in a draft's decoder layers and save the draft "
                    "with its masks and sparsity_manifest.json.",
    )
    parser.add_argument("--model", required=True, help="Hub id or folder of the dense draft")
    parser.add_argument("--method", choices=METHODS, default="sparsegpt", help="pruning method (default sparsegpt)")
    parser.add_argument("--sparsity", type=_parse_sparsity, default=None,
                        help="fraction of weights to prune per layer, in [0, 1) (default 0.5; "
                             "implied by --pattern)")
    parser.add_argument("--pattern", default=None,
                        help="N:M semi-structured pattern: keep N of every M consecutive input "
                             "weights per row, e.g. 2:4 (default unstructured)")
    parser.add_argument("--calibration", default="sharegpt",
                        help="distilled folder or data set name (sharegpt, gsm8k); 'none' for "
                             "magnitude pruning without calibration (default sharegpt)")
    parser.add_argument("--num-calibration-samples", type=int, default=128,
                        help="calibration samples of --max-seq-length tokens (default 128)")
    parser.add_argument("--max-seq-length", type=int, default=512, help="tokens per calibration sample (default 512)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="SparseGPT columns per lazy-update block (default 128)")
    parser.add_argument("--dampening-frac", type=float, default=DEFAULT_DAMPENING_FRAC,
                        help="SparseGPT Hessian dampening as a fraction of its mean diagonal (default 0.01)")
    parser.add_argument("--include-lm-head", action="store_true", help="prune lm_head too (default: dense)")
    parser.add_argument("--compressed-out", default=None,
                        help="also write the draft in the compressed bitmask format to this folder")
    parser.add_argument("--overwrite", action="store_true", help="prune again even if --out contains a pruned draft")
    parser.add_argument("--out", required=True, help="folder of the pruned draft")
    parser.set_defaults(func=_prune_command)
