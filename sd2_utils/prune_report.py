"""Measurements behind notebook 02_sparsification: calibration choice, per-layer tables,
perplexity of dense, pruned and layer-pruned drafts.

Long measurements are cached in a JSON file, one entry per draft or baseline, written
atomically after each entry, so a rerun (or a crashed run) skips what is already measured.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .calibration import fingerprint as calibration_fingerprint
from .calibration import perplexity
from .io import atomic_write_json, read_json

logger = logging.getLogger(__name__)


def calibration_source(run_dir: str | os.PathLike, dataset: str = "sharegpt") -> str:
    """Return ``RUN_DIR/distill/<dataset>`` when the distillation stage finished it, else `dataset`.

    A distilled folder counts as finished once it has ``summary.json``, which ``sd2 distill``
    writes last. The choice is logged, because it changes what the drafts are calibrated on.
    """
    distilled = Path(run_dir) / "distill" / dataset
    if (distilled / "summary.json").is_file():
        logger.info("Calibration: distilled data at %s", distilled)
        return str(distilled)
    state = "unfinished" if distilled.is_dir() else "missing"
    logger.info("Calibration: %s conversations with their original assistant turns (distilled data at %s is %s)",
                dataset, distilled, state)
    return dataset


def layer_table(manifest: dict[str, Any]) -> pd.DataFrame:
    """Tabulate a manifest: one row per pruned linear layer (layer index, module, shape, sparsity, error)."""
    rows = []
    for name, entry in manifest["layers"].items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        rows.append({
            "layer": int(match.group(1)) if match else -1,
            "module": match.group(2) if match else name,
            "out_features": entry["shape"][0],
            "in_features": entry["shape"][1],
            "sparsity": entry["sparsity"],
            "reconstruction_error": entry["reconstruction_error"],
            "dampening_frac": entry["dampening_frac"],
            "seconds": entry["seconds"],
        })
    return pd.DataFrame(rows)


def _cached(cache_path: Path, key: str, fingerprint: str, measure) -> dict[str, Any]:
    """Return the cached entry for `key` if it was measured on the same samples, else measure."""
    cache = read_json(cache_path, default={}) or {}
    if key in cache and cache[key].get("fingerprint") == fingerprint:
        return cache[key]
    started = time.perf_counter()
    entry = measure()
    entry["seconds"] = round(time.perf_counter() - started, 1)
    entry["fingerprint"] = fingerprint
    cache = read_json(cache_path, default={}) or {}
    cache[key] = entry
    atomic_write_json(cache_path, cache)
    return entry


def draft_perplexity(
    directory: str | os.PathLike, heldout: Sequence[torch.Tensor], cache_path: str | os.PathLike, key: str
) -> dict[str, Any]:
    """Measure (or read from the cache) the perplexity of a saved or named draft."""
    from .metrics import count_macs
    from .models import load_model

    def measure():
        model, _ = load_model(directory)
        return {"perplexity": perplexity(model, heldout), "macs_per_token": count_macs(model).total,
                "source": str(directory)}

    fingerprint = calibration_fingerprint(heldout) + f"|{directory}"
    return _cached(Path(cache_path), key, fingerprint, measure)


def baseline_perplexity(
    model_name: str,
    method: str,
    pattern: str | None,
    samples: Sequence[torch.Tensor],
    heldout: Sequence[torch.Tensor],
    cache_path: str | os.PathLike,
    key: str,
) -> dict[str, Any]:
    """Prune `model_name` in memory with a baseline method and measure its perplexity.

    Baselines are not saved: only their perplexity and mean reconstruction error are kept.
    Magnitude pruning ignores `samples`, so it reports no reconstruction error.
    """
    from .metrics import count_macs
    from .models import load_model
    from .prune import prune_model, resolve_settings

    def measure():
        model, _ = load_model(model_name)
        settings = resolve_settings(method, None if pattern else 0.5, pattern)
        results = prune_model(model, None if method == "magnitude" else samples, settings)
        errors = [entry["reconstruction_error"] for entry in results.values()
                  if entry["reconstruction_error"] is not None]
        return {"perplexity": perplexity(model, heldout), "macs_per_token": count_macs(model).total,
                "mean_reconstruction_error": sum(errors) / len(errors) if errors else None,
                "num_calibration_samples": 0 if method == "magnitude" else len(samples),
                "source": "in memory"}

    fingerprint = calibration_fingerprint(heldout) + "|" + calibration_fingerprint(samples)
    return _cached(Path(cache_path), key, fingerprint, measure)
