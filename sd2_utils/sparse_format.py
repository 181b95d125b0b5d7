"""Compressed sparse storage: a bitmask format in safetensors, and packed masks.

Layout of a compressed draft folder (``save_compressed``):

- ``config.json``, ``generation_config.json`` and the tokenizer files, as ``save_pretrained``
  writes them;
- ``model.sparse_bitmask.safetensors``: every 2-D weight with at least one zero is stored as
  three tensors. ``<name>.values`` contains the nonzero entries in row-major order (original
  dtype). ``<name>.bitmask`` is uint8 ``[rows, ceil(columns / 8)]``, with bit ``j % 8`` of byte
  ``j // 8`` set when column ``j`` is nonzero. ``<name>.shape`` is int64 ``[2]``. Every other
  tensor is stored dense under its own name, and tied tensors (a tied ``lm_head``) once;
- ``sparse_format.json``: format name and version, the compressed tensor names and the tied
  aliases.

A 50% sparse float32 matrix takes ``0.5 * 4 + 1/8`` bytes per weight instead of 4 (53%).
Embeddings and ``lm_head`` stay dense, so the whole folder shrinks less (measured sizes are
in ``benchmarks/README.md``).

compressed-tensors' ``sparse-bitmask`` compressor stores the same three parts per weight (plus
row offsets), but its last release that ships the compressor (0.14.0) requires
``transformers<5`` and newer releases dropped it, so it cannot be installed beside this
project's ``transformers`` 5; this module writes its own format with ``safetensors``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

FORMAT_NAME = "sd2-sparse-bitmask"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.sparse_bitmask.safetensors"
INDEX_NAME = "sparse_format.json"

_BIT_VALUES = 2 ** torch.arange(8, dtype=torch.int32)  # little-endian bit order within a byte


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[rows, columns]`` tensor into uint8 ``[rows, ceil(columns / 8)]``."""
    rows, columns = mask.shape
    padded_columns = -(-columns // 8) * 8
    padded = torch.zeros(rows, padded_columns, dtype=torch.int32)
    padded[:, :columns] = mask.to(torch.int32)
    return (padded.reshape(rows, -1, 8) * _BIT_VALUES).sum(dim=2).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Invert ``pack_bits``: uint8 ``[rows, ceil(columns / 8)]`` to bool ``[rows, columns]``."""
    bits = (packed.to(torch.int32).unsqueeze(-1) & _BIT_VALUES) != 0  # [rows, bytes, 8]
    return bits.reshape(packed.shape[0], -1)[:, :columns]


def compress_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split each sparse 2-D tensor into values, bitmask and shape; keep the others dense.

    Returns:
        (tensors to save, names of the compressed weights).
    """
    stored: dict[str, torch.Tensor] = {}
    compressed: list[str] = []
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.dim() == 2 and tensor.is_floating_point() and bool((tensor == 0).any()):
            nonzero = tensor != 0
            stored[f"{name}.values"] = tensor[nonzero].contiguous()
            stored[f"{name}.bitmask"] = pack_bits(nonzero)
            stored[f"{name}.shape"] = torch.tensor(list(tensor.shape), dtype=torch.int64)
            compressed.append(name)
        else:
            stored[name] = tensor.contiguous()
    return stored, compressed


def decompress_state_dict(stored: dict[str, torch.Tensor], compressed: list[str]) -> dict[str, torch.Tensor]:
    """Invert ``compress_state_dict``."""
    state = {name: tensor for name, tensor in stored.items()
             if not any(name == f"{c}.{part}" for c in compressed for part in ("values", "bitmask", "shape"))}
    for name in compressed:
        rows, columns = (int(size) for size in stored[f"{name}.shape"])
        values = stored[f"{name}.values"]
        nonzero = unpack_bits(stored[f"{name}.bitmask"], columns)
        dense = torch.zeros(rows, columns, dtype=values.dtype)
        dense[nonzero] = values
        state[name] = dense
    return state


def _unique_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the state dict without tied duplicates, and a map alias -> stored name."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor
    return unique, aliases


def save_compressed(model: torch.nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` in the bitmask format described in the module docstring.

    Returns:
        the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    unique, aliases = _unique_state_dict(model)
    stored, compressed = compress_state_dict(unique)
    save_file(stored, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
    atomic_write_json(directory / INDEX_NAME, {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "compressed": compressed,
        "aliases": aliases,
    })
    logger.info("Saved %d compressed and %d dense tensors to %s",
                len(compressed), len(unique) - len(compressed), directory)
    return directory


def load_compressed(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a folder written by ``save_compressed`` into a dense model (weights identical).

    Raises:
        FileNotFoundError: the folder lacks ``sparse_format.json``.
        ValueError: the folder contains another format, or tensors are missing or unexpected.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    index = read_json(directory / INDEX_NAME)
    if index is None:
        raise FileNotFoundError(
            f"{directory / INDEX_NAME} not found; write the folder with `save_compressed` "
            f"(`sd2 prune --compressed`) or load a dense folder with from_pretrained"
        )
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{directory} holds format {index.get('format')!r}, expected {FORMAT_NAME!r}")
    config = AutoConfig.from_pretrained(directory)
    # Built on the CPU, not the meta device: non-persistent buffers (rotary frequencies) are
    # not in the state dict and must be initialised by the constructor.
    model = AutoModelForCausalLM.from_config(config)
    state = decompress_state_dict(load_file(str(directory / WEIGHTS_NAME)), index["compressed"])
    for alias, name in index["aliases"].items():
        state[alias] = state[name]
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
