"""Speculative decoding metrics: mean accepted length (MAL), acceptance, MACs, improvement factor.

Conventions (the ones SD², Lasby et al. 2025, reports):

- **MAL** (mean accepted length) = tokens emitted / target forward passes. Every verification
  round is one target forward pass and emits the accepted draft tokens plus one token the target
  produces itself (the correction after a rejection, or the bonus token when the whole block is
  accepted). So MAL >= 1, a draft that is never right gives exactly 1, and K accepted tokens per
  round give K + 1. The prompt prefill shares its forward pass with the first round and is not
  counted separately.
- **MAL without the last round**: the final round of an answer is often cut short by EOS or by
  `max_new_tokens`, which lowers MAL for short answers. The variant drops each answer's final
  round before pooling.
- **MACs per token**: multiply-accumulates of one forward pass for one token, counted
  analytically. Each linear layer counts its non-zero weights, the `lm_head` is counted
  separately (dense unless pruned), the attention score and value products grow with the
  context length, and embedding lookups, norms, activations and bias additions count 0.
- **Improvement factor** = MAL / (K * c + 1) with c = draft MACs / target MACs: the MACs the
  target alone spends per token divided by the MACs speculative decoding spends per token,
  when a round costs K draft passes and one target pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A layer with a smaller fraction of zeros counts as dense in `count_macs`. 50% and 2:4 drafts
# are far above it, and dequantized GGUF weights (about 4% exact zeros in the embedded
# Qwen2.5-Coder-0.5B) are far below.
DENSE_BELOW_SPARSITY = 0.2


# ----------------------------------------------------------------------------------------------
# Mean accepted length and acceptance


def mean_accepted_length(emitted_per_round: Sequence[Sequence[int]] | Sequence[int]) -> float:
    """Compute MAL = tokens emitted / target forward passes, pooled over answers.

    Args:
        emitted_per_round: tokens emitted by each verification round (accepted draft tokens
            plus the target's own token), either one flat list for one answer or one list per
            answer. Each round is one target forward pass.

    Returns:
        The pooled MAL, or NaN when there are no rounds.
    """
    rounds = [n for answer in _as_answers(emitted_per_round) for n in answer]
    return sum(rounds) / len(rounds) if rounds else math.nan


def mean_accepted_length_without_last(emitted_per_round: Sequence[Sequence[int]]) -> float:
    """Compute MAL after dropping each answer's final round (often cut short by EOS or the budget).

    Answers with a single round contribute nothing. Returns NaN when no round is left.
    """
    rounds = [n for answer in _as_answers(emitted_per_round) for n in answer[:-1]]
    return sum(rounds) / len(rounds) if rounds else math.nan


def _as_answers(values: Sequence) -> list[Sequence[int]]:
    if len(values) and not isinstance(values[0], (list, tuple)):
        return [values]
    return list(values)


def acceptance_per_position(
    drafted_per_round: Iterable[int], accepted_per_round: Iterable[int], num_positions: int | None = None
) -> list[float]:
    """Compute the acceptance rate at each draft position (1-based position i is index i-1).

    The rate at position i is the fraction of rounds that drafted at least i tokens in which
    the i-th drafted token was accepted. Verification stops at the first rejection, so a
    token after a rejected one counts as not accepted.

    Args:
        drafted_per_round: tokens the draft proposed in each round (in target tokens).
        accepted_per_round: draft tokens the target accepted in each round.
        num_positions: length of the result; defaults to the largest block drafted.

    Returns:
        One rate per position, NaN for a position that no round reached.
    """
    drafted = list(drafted_per_round)
    accepted = list(accepted_per_round)
    if len(drafted) != len(accepted):
        raise ValueError(
            f"drafted_per_round has {len(drafted)} rounds but accepted_per_round has {len(accepted)}. "
            "Pass one value per round to each"
        )
    width = num_positions if num_positions is not None else max(drafted, default=0)
    reached = [0] * width
    hits = [0] * width
    for num_drafted, num_accepted in zip(drafted, accepted):
        for position in range(min(num_drafted, width)):
            reached[position] += 1
            hits[position] += position < num_accepted
    return [h / r if r else math.nan for h, r in zip(hits, reached)]


def acceptance_alpha(drafted_per_round: Iterable[int], accepted_per_round: Iterable[int]) -> float:
    """Estimate the per-token acceptance probability α.

    Under the usual model that each drafted token is accepted independently with probability α
    until the first rejection, the maximum-likelihood estimate is accepted tokens / tokens
    examined, where a round examines its accepted tokens plus the rejected one (if any).

    Returns:
        α in [0, 1], or NaN when no token was examined.
    """
    accepted_total = 0
    examined = 0
    for num_drafted, num_accepted in zip(drafted_per_round, accepted_per_round):
        accepted_total += num_accepted
        examined += num_accepted + (1 if num_accepted < num_drafted else 0)
    return accepted_total / examined if examined else math.nan


def expected_mal(alpha: float, num_assistant_tokens: int) -> float:
    """Expected MAL (1 - α^(K+1)) / (1 - α) for a fixed K and independent acceptances.

    This is the expected number of tokens per round with K drafted tokens (Leviathan et al.
    2023, "Fast Inference from Transformers via Speculative Decoding", equation 1). α = 1 gives K + 1.
    """
    if math.isnan(alpha):
        return math.nan
    if alpha >= 1.0:
        return float(num_assistant_tokens + 1)
    return (1.0 - alpha ** (num_assistant_tokens + 1)) / (1.0 - alpha)


def improvement_factor(mal: float, num_assistant_tokens: int, cost_ratio: float) -> float:
    """Theoretical improvement factor MAL / (K * c + 1), with c = draft MACs / target MACs."""
    return mal / (num_assistant_tokens * cost_ratio + 1.0)


# ----------------------------------------------------------------------------------------------
# MACs


@dataclasses.dataclass
class MacCount:
    """Multiply-accumulates of one forward pass for one token.

    Attributes:
        linear: MACs of the linear layers inside the decoder blocks, keyed by module name
            (or by a template name such as ``layers.0.mlp.down_proj`` when counted from a config).
        lm_head: MACs of the output projection (vocabulary x hidden, minus its zeros).
        attention: MACs of the attention score (QK^T) and value (AV) products at `context_length`.
        context_length: number of keys each query attends to.
        source: ``weights`` (zeros counted in the model's tensors) or ``config`` (shapes from the
            configuration, sparsity declared).
    """

    linear: dict[str, int]
    lm_head: int
    attention: int
    context_length: int
    source: str

    @property
    def linear_total(self) -> int:
        return sum(self.linear.values())

    @property
    def total(self) -> int:
        return self.linear_total + self.lm_head + self.attention

    def __int__(self) -> int:
        return self.total

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "linear": self.linear_total,
            "lm_head": self.lm_head,
            "attention": self.attention,
            "context_length": self.context_length,
            "source": self.source,
        }


def count_macs(
    model_or_config: Any,
    sparsity: float | None = None,
    context_length: int = 0,
    include_lm_head: bool = True,
    lm_head_sparsity: float = 0.0,
    min_sparsity: float = DENSE_BELOW_SPARSITY,
) -> MacCount:
    """Count the MACs of one forward pass for one token, counting only non-zero weights.

    Args:
        model_or_config: a causal LM (``torch.nn.Module``), a ``transformers`` configuration,
            or a configuration dict (the contents of ``config.json``). Given a model, each
            ``nn.Linear`` inside the decoder counts its non-zero weights. Given a
            configuration, the layer shapes come from the hidden size, intermediate size,
            head counts and head dimension of a Llama-style decoder block (q, k, v, o
            projections and a gated MLP).
        sparsity: declared fraction of zero weights in every decoder linear layer, for when
            there are no weights to inspect (a configuration, or a dense model you are about
            to prune). With a model, it replaces counting its zeros.
        context_length: keys each query attends to. 0 leaves the attention products out, as
            SD² does for its MAC figures. Sliding-window layers attend to at most their window.
        include_lm_head: count the output projection. Set False to compare decoder blocks alone.
        lm_head_sparsity: declared sparsity of the output projection for a configuration (or
            with `sparsity` on a model). SD² keeps it dense. When zeros are counted from a
            model's weights, a pruned `lm_head` shows its own zeros.
        min_sparsity: when zeros are counted from a model's weights, a layer with a smaller
            fraction of zeros counts as dense. Such zeros are incidental, not pruning: weights
            dequantized from GGUF have a few percent of exact zeros, and no kernel skips them.

    Returns:
        A ``MacCount``; ``.total`` (or ``int(...)``) is the number of MACs per token.

    Raises:
        ValueError: a sparsity outside [0, 1), a negative context length, or a configuration
            that lacks the fields the count needs.
    """
    for name, value in (("sparsity", sparsity), ("lm_head_sparsity", lm_head_sparsity)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {value!r}. Pass e.g. 0.5 for 50% zeros")
    if context_length < 0:
        raise ValueError(f"`context_length` must be >= 0, got {context_length}")

    if isinstance(model_or_config, torch.nn.Module):
        config = _text_config(model_or_config.config)
        linear, lm_head = _linear_macs_from_model(model_or_config, sparsity, lm_head_sparsity, min_sparsity)
        source = "weights" if sparsity is None else "config"
    else:
        config = _text_config(model_or_config)
        linear, lm_head = _linear_macs_from_config(config, sparsity or 0.0, lm_head_sparsity)
        source = "config"
    attention = _attention_macs(config, context_length)
    return MacCount(
        linear=linear,
        lm_head=lm_head if include_lm_head else 0,
        attention=attention,
        context_length=context_length,
        source=source,
    )


def _text_config(config: Any) -> dict[str, Any]:
    """Return the decoder configuration as a dict (multimodal configs nest it in ``text_config``)."""
    if not isinstance(config, Mapping):
        config = config.to_dict()
    config = dict(config)
    nested = config.get("text_config")
    if isinstance(nested, Mapping):
        config = dict(nested)
    return config


def _require(config: Mapping[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(
            f"configuration is missing `{key}`, which counting MACs needs. Pass a decoder-only "
            f"causal LM configuration (keys present: {', '.join(sorted(config)[:20])} ...)"
        )
    return config[key]


def _head_dim(config: Mapping[str, Any]) -> int:
    if config.get("head_dim"):
        return int(config["head_dim"])
    return int(_require(config, "hidden_size")) // int(_require(config, "num_attention_heads"))


def _linear_macs_from_config(
    config: Mapping[str, Any], sparsity: float, lm_head_sparsity: float
) -> tuple[dict[str, int], int]:
    hidden = int(_require(config, "hidden_size"))
    intermediate = int(_require(config, "intermediate_size"))
    num_layers = int(_require(config, "num_hidden_layers"))
    num_heads = int(_require(config, "num_attention_heads"))
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    vocab = int(_require(config, "vocab_size"))
    head_dim = _head_dim(config)

    shapes = {
        "self_attn.q_proj": hidden * num_heads * head_dim,
        "self_attn.k_proj": hidden * num_kv_heads * head_dim,
        "self_attn.v_proj": hidden * num_kv_heads * head_dim,
        "self_attn.o_proj": num_heads * head_dim * hidden,
        "mlp.gate_proj": hidden * intermediate,
        "mlp.up_proj": hidden * intermediate,
        "mlp.down_proj": intermediate * hidden,
    }
    linear = {
        f"layers.{layer}.{name}": _kept(weights, sparsity)
        for layer in range(num_layers)
        for name, weights in shapes.items()
    }
    return linear, _kept(vocab * hidden, lm_head_sparsity)


def _kept(num_weights: int, sparsity: float) -> int:
    return int(round(num_weights * (1.0 - sparsity)))


def _counted_weights(weight: torch.Tensor, min_sparsity: float) -> int:
    """Count a layer's non-zero weights, or all of them when its zeros are incidental."""
    nonzero = int(torch.count_nonzero(weight))
    return nonzero if 1.0 - nonzero / weight.numel() >= min_sparsity else weight.numel()


def _linear_macs_from_model(
    model: torch.nn.Module, sparsity: float | None, lm_head_sparsity: float, min_sparsity: float
) -> tuple[dict[str, int], int]:
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear: dict[str, int] = {}
    lm_head = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if module is output_embeddings:
            # A tied lm_head shares the embedding matrix, but it still multiplies every row.
            lm_head = (
                _counted_weights(weight, min_sparsity) if sparsity is None
                else _kept(weight.numel(), lm_head_sparsity)
            )
            continue
        linear[name] = (
            _counted_weights(weight, min_sparsity) if sparsity is None else _kept(weight.numel(), sparsity)
        )
    if output_embeddings is None:
        logger.warning("model %s has no output embeddings, so lm_head MACs count 0", type(model).__name__)
    return linear, lm_head


def _attention_macs(config: Mapping[str, Any], context_length: int) -> int:
    """MACs of QK^T and AV for one query token attending to `context_length` keys, all layers."""
    if context_length == 0:
        return 0
    num_layers = int(_require(config, "num_hidden_layers"))
    num_heads = int(_require(config, "num_attention_heads"))
    head_dim = _head_dim(config)
    layer_types = config.get("layer_types") or ["full_attention"] * num_layers
    window = config.get("sliding_window")
    total = 0
    for layer_type in layer_types[:num_layers]:
        keys = context_length
        if layer_type == "sliding_attention" and window:
            keys = min(context_length, int(window))
        # Scores: num_heads x head_dim per key; values: the same again.
        total += 2 * num_heads * head_dim * keys
    return total


def mac_reduction(dense: MacCount | int, sparse: MacCount | int) -> float:
    """Fraction of MACs removed: 1 - sparse / dense."""
    return 1.0 - int(sparse) / int(dense)
