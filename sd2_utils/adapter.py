"""Model adapter: the one module that locates a causal LM's decoder blocks.

Pruning, layer pruning and the masks of sparse fine-tuning all ask the same questions of a
model: which modules are the decoder layers, which ``nn.Linear`` modules each layer holds, where
the embeddings, the final norm and the ``lm_head`` are. This module answers them for any
``transformers`` decoder-only model by inspecting the module tree (no hard-coded path such as
``model.model.layers``). It is tested on Llama (SmolLM2), Qwen2 and Gemma3.

It also runs a model layer by layer: ``capture_layer_inputs`` records what the model passes to
each decoder layer (hidden states, attention masks, rotary position embeddings), so that a
caller can feed those layers one at a time, as SparseGPT and the layer-pruning metrics do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Attribute names of the final norm in the module that contains the decoder layers: `norm` in
# Llama, Qwen2, Gemma3 and Mistral; `final_layernorm` in Phi; `ln_f` in GPT-2 style models.
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f")


def text_config(model: nn.Module) -> Any:
    """Return the decoder's configuration (multimodal models nest it in ``text_config``)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _linear_count(module: nn.Module) -> int:
    return sum(isinstance(child, nn.Linear) for child in module.modules())


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the ``nn.ModuleList`` of decoder layers.

    The decoder layers are the longest ``nn.ModuleList`` whose items all contain linear layers.
    When the configuration states ``num_hidden_layers``, the list must have that length.

    Returns:
        (dotted name of the list inside `model`, the list).

    Raises:
        ValueError: no such list exists.
    """
    expected = getattr(text_config(model), "num_hidden_layers", None) if hasattr(model, "config") else None
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(_linear_count(layer) > 0 for layer in module):
            continue
        if expected is not None and len(module) != expected:
            continue
        candidates.append((len(module), name.endswith("layers"), name, module))
    if not candidates:
        raise ValueError(
            f"no decoder layers found in {type(model).__name__}: expected an nn.ModuleList of "
            f"{expected if expected is not None else 'N'} blocks that contain nn.Linear modules; "
            f"pass a decoder-only causal LM (Llama, Qwen2, Gemma3 and similar)"
        )
    # Longest list first; on a tie prefer the one named `...layers`.
    candidates.sort(key=lambda item: (item[0], item[1]), reverse=True)
    _, _, name, module = candidates[0]
    return name, module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return find_decoder_layers(model)[1]


def _parent_of(model: nn.Module, dotted_name: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attribute


def decoder_module(model: nn.Module) -> nn.Module:
    """Return the module that owns the decoder layers (``model.model`` in Llama and Qwen2)."""
    name, _ = find_decoder_layers(model)
    return _parent_of(model, name)[0]


def replace_decoder_layers(model: nn.Module, layers: Sequence[nn.Module]) -> nn.ModuleList:
    """Install `layers` as the model's decoder layers and return the new list."""
    name, _ = find_decoder_layers(model)
    parent, attribute = _parent_of(model, name)
    new_list = nn.ModuleList(layers)
    setattr(parent, attribute, new_list)
    return new_list


def linear_layers(layer: nn.Module) -> dict[str, nn.Linear]:
    """Return the ``nn.Linear`` modules of one decoder layer, by name relative to the layer."""
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def decoder_linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Return every ``nn.Linear`` inside the decoder layers, by its full name in `model`.

    These are the layers that pruning targets: attention projections and MLP projections.
    Embeddings and ``lm_head`` are outside the decoder layers and not included.
    """
    prefix, layers = find_decoder_layers(model)
    found: dict[str, nn.Linear] = {}
    for index, layer in enumerate(layers):
        for name, module in linear_layers(layer).items():
            found[f"{prefix}.{index}.{name}"] = module
    return found


def input_embeddings(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


def lm_head(model: nn.Module) -> nn.Linear | None:
    """Return the output projection, or None for a model without one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def lm_head_name(model: nn.Module) -> str | None:
    head = lm_head(model)
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def final_norm(model: nn.Module) -> nn.Module:
    """Return the norm applied after the last decoder layer.

    Raises:
        ValueError: the module that owns the decoder layers has none of the usual names.
    """
    owner = decoder_module(model)
    for attribute in _FINAL_NORM_NAMES:
        module = getattr(owner, attribute, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"no final norm found in {type(owner).__name__}: looked for attributes "
        f"{', '.join(_FINAL_NORM_NAMES)}; add the attribute name to _FINAL_NORM_NAMES"
    )


def layer_output(output: Any) -> torch.Tensor:
    """Return the hidden states from a decoder layer's output (a tensor, or a tuple in older
    ``transformers`` versions)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed inputs are recorded."""


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, samples: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Record the inputs of every decoder layer for each sample, without running the layers.

    Each decoder layer's ``forward`` is replaced for the duration of the call by one that records
    its keyword arguments and returns the hidden states unchanged, and the forward pass stops at
    the final norm. The cost is therefore the embedding lookup plus building masks and rotary
    embeddings. The keyword arguments differ per layer in models that mix sliding-window and
    full attention (Gemma3), which is why each layer's arguments are kept.

    Args:
        samples: token ids, each of shape ``[seq_len]`` (one sequence, no padding).

    Returns:
        (hidden_states, layer_kwargs). ``hidden_states[s]`` is the input of layer 0 for sample
        `s`, shape ``[1, seq_len, hidden_size]``. ``layer_kwargs[s][i]`` are the keyword
        arguments of layer `i` for sample `s`. Tensors shared between layers are stored once.
    """
    layers = decoder_layers(model)
    norm = final_norm(model)
    hidden_states: list[torch.Tensor] = []
    layer_kwargs: list[list[dict[str, Any]]] = []
    current: dict[int, dict[str, Any]] = {}

    def make_recorder(index: int):
        def record(hidden, *args, **kwargs):
            if args:
                raise RuntimeError(
                    f"decoder layer {index} received {len(args)} positional arguments besides the "
                    f"hidden states; the adapter expects keyword arguments only"
                )
            if index == 0:
                hidden_states.append(hidden.detach())
            current[index] = kwargs
            return hidden

        return record

    def stop(module, args):
        raise _StopForward

    device = next(model.parameters()).device
    for index, layer in enumerate(layers):
        layer.forward = make_recorder(index)
    hook = norm.register_forward_pre_hook(stop)
    try:
        for sample in samples:
            current.clear()
            try:
                model(input_ids=sample.reshape(1, -1).to(device), use_cache=False)
            except _StopForward:
                pass
            layer_kwargs.append([current[index] for index in range(len(layers))])
    finally:
        hook.remove()
        for layer in layers:
            del layer.forward
    return hidden_states, layer_kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one decoder layer on recorded inputs and return its output hidden states."""
    return layer_output(layer(hidden, **kwargs))
