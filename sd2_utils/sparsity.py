"""Pruning math for one linear layer: masks, SparseGPT, the Hessian and reconstruction error.

Tensors in, tensors out: nothing here reads models, data or files (``prune.py`` drives
these functions layer by layer).

Notation (Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", arXiv 2301.00774): a linear layer computes ``W X`` with ``W`` of shape
``[rows, columns]`` = ``[out_features, in_features]`` and calibration inputs ``X`` of shape
``[columns, num_tokens]``. The layer-wise problem minimises ``||W X - W' X||^2`` over pruned
``W'``. Its Hessian is ``H = 2 X X^T / num_tokens``; we keep ``X X^T / num_tokens``, because a
constant factor changes neither the SparseGPT update (dampening is relative to the mean of
``diag(H)``) nor the relative error.

Masks are boolean tensors of the weight's shape, ``True`` where a weight is kept. The count of
pruned weights is exact:

- magnitude: per layer, ``round(sparsity * rows * columns)`` weights;
- Wanda: per output row, ``round(sparsity * columns)`` weights in every row;
- SparseGPT: per layer, with the count split over blocks of ``block_size`` columns so that the
  first ``c`` columns hold ``round(sparsity * rows * c)`` pruned weights for every block edge
  ``c``;
- N:M (any method): at most ``N`` kept weights in every group of ``M`` consecutive input
  columns of a row (NVIDIA's 2:4 keeps 2 of 4), so exactly ``M - N`` pruned per group.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

# Chosen defaults from SparseGPT's reference implementation and paper: dampening of 1% of the
# mean Hessian diagonal, and lazy batch updates over blocks of 128 columns.
DEFAULT_DAMPENING_FRAC = 0.01
DEFAULT_BLOCK_SIZE = 128
# Each failed Cholesky factorisation multiplies the dampening by this factor; after
# MAX_DAMPENING_RETRIES failures the layer fails. Chosen defaults.
DAMPENING_GROWTH = 10.0
MAX_DAMPENING_RETRIES = 5


class CholeskyError(RuntimeError):
    """Raised when the dampened Hessian stays non positive definite after every retry."""


def validate_sparsity(sparsity: float) -> float:
    """Return `sparsity` as a float, or raise ValueError when it is outside [0, 1)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"invalid sparsity {sparsity!r}: it must be a fraction of pruned weights in [0, 1), "
            f"e.g. 0.5 for 50%"
        )
    return float(sparsity)


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Parse an N:M pattern such as ``"2:4"`` into ``(n, m)``: keep `n` of every `m` weights.

    Returns None for None, ``""`` and ``"unstructured"``.

    Raises:
        ValueError: the text is not ``N:M`` with integers ``0 < N < M``.
    """
    if pattern is None or pattern in ("", "unstructured"):
        return None
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if match is None:
            raise ValueError(
                f"invalid N:M pattern {pattern!r}: write it as two integers N:M, e.g. '2:4'"
            )
        n, m = int(match.group(1)), int(match.group(2))
    else:
        n, m = (int(value) for value in pattern)
    if not 0 < n < m:
        raise ValueError(
            f"invalid N:M pattern {n}:{m}: N (weights kept per group) must satisfy 0 < N < M "
            f"(group size); use e.g. 2:4 or 4:8"
        )
    return n, m


def pattern_sparsity(pattern: tuple[int, int]) -> float:
    n, m = pattern
    return 1.0 - n / m


def check_pattern_fits(in_features: int, pattern: tuple[int, int] | None, layer_name: str) -> None:
    """Raise ValueError when `in_features` is not a multiple of the group size M."""
    if pattern is not None and in_features % pattern[1] != 0:
        raise ValueError(
            f"invalid N:M pattern {pattern[0]}:{pattern[1]} for layer {layer_name}: its "
            f"in_features={in_features} is not divisible by M={pattern[1]}; choose M that "
            f"divides every layer's input size"
        )


def _lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Return a bool mask, True at the `count` lowest entries of `scores` (any shape)."""
    flat = scores.flatten()
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if count >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    # kthvalue is several times faster than topk for large counts; ties at the threshold are
    # broken by position so that exactly `count` entries are selected.
    threshold = torch.kthvalue(flat, count).values
    pruned = flat < threshold
    ties = torch.nonzero(flat == threshold).flatten()
    pruned[ties[: count - int(pruned.sum())]] = True
    return pruned.view_as(scores)


def nm_pruned(scores: torch.Tensor, pattern: tuple[int, int]) -> torch.Tensor:
    """Return a bool mask, True at the ``M - N`` lowest scores of each group of M columns.

    Args:
        scores: ``[rows, columns]`` with ``columns`` divisible by M.
    """
    n, m = pattern
    rows, columns = scores.shape
    grouped = scores.reshape(rows, columns // m, m)
    pruned = torch.zeros_like(grouped, dtype=torch.bool)
    pruned.scatter_(2, torch.topk(grouped, m - n, dim=2, largest=False).indices, True)
    return pruned.reshape(rows, columns)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep the largest ``|W|``: per layer (unstructured) or per group of M (N:M).

    Returns:
        keep mask, bool ``[rows, columns]``.
    """
    scores = weight.detach().abs().float()
    if pattern is not None:
        return ~nm_pruned(scores, pattern)
    return ~_lowest_mask(scores, round(sparsity * scores.numel()))


def wanda_mask(
    weight: torch.Tensor,
    input_norms: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Keep the largest ``|W_ij| * ||X_j||`` in each output row (Sun et al. 2023, "A Simple and
    Effective Pruning Approach for Large Language Models", arXiv 2306.11695).

    Args:
        weight: ``[rows, columns]``.
        input_norms: ``[columns]``, the L2 norm of each input feature over the calibration
            tokens (any common scale: ``sqrt(diag(H))`` works).

    Returns:
        keep mask, bool ``[rows, columns]``.
    """
    scores = weight.detach().abs().float() * input_norms.float().reshape(1, -1)
    if pattern is not None:
        return ~nm_pruned(scores, pattern)
    count = round(sparsity * scores.shape[1])
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        pruned.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, True)
    return ~pruned


def accumulate_hessian(hessian: torch.Tensor, inputs: torch.Tensor, num_tokens: int) -> int:
    """Add a batch of layer inputs to a running mean of ``X X^T``.

    Args:
        hessian: ``[columns, columns]`` float32, updated in place. It contains the mean of
            ``x x^T`` over the `num_tokens` tokens seen so far.
        inputs: ``[..., columns]``, the inputs of the linear layer.
        num_tokens: tokens already in `hessian`.

    Returns:
        the new token count.
    """
    flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()  # [tokens, columns]
    added = flat.shape[0]
    total = num_tokens + added
    hessian.mul_(num_tokens / total)
    hessian.addmm_(flat.t(), flat, alpha=1.0 / total)
    return total


def reconstruction_error(
    weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor
) -> float:
    """Relative layer-wise error ``||(W - W') X||^2 / ||W X||^2`` on the calibration inputs.

    Computed as ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - W'``, ``H = X X^T / tokens``.
    """
    weight = weight.float()
    delta = weight - new_weight.float()
    numerator = ((delta @ hessian) * delta).sum()
    denominator = ((weight @ hessian) * weight).sum()
    return float(numerator / denominator) if denominator > 0 else 0.0


def _inverse_hessian_factor(
    hessian: torch.Tensor, dampening_frac: float, layer_name: str
) -> tuple[torch.Tensor, float]:
    """Return the upper Cholesky factor of ``(H + lambda I)^-1`` and the dampening used.

    ``lambda = dampening_frac * mean(diag(H))``. When a factorisation fails, `dampening_frac` is
    multiplied by ``DAMPENING_GROWTH`` and a warning names the layer and the new value.
    """
    columns = hessian.shape[0]
    mean_diagonal = torch.diagonal(hessian).mean()
    current = dampening_frac
    for attempt in range(MAX_DAMPENING_RETRIES + 1):
        dampened = hessian.clone()
        dampened.diagonal().add_(current * mean_diagonal)
        factor, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return factor, current
        if attempt == MAX_DAMPENING_RETRIES:
            break
        previous, current = current, current * DAMPENING_GROWTH
        logger.warning(
            "Cholesky factorisation of the Hessian of %s failed with dampening_frac=%g "
            "(%d columns); retrying with dampening_frac=%g",
            layer_name, previous, columns, current,
        )
    raise CholeskyError(
        f"Cholesky factorisation of the Hessian of {layer_name} failed even with "
        f"dampening_frac={current:g}; check the calibration inputs for NaN or inf values, or "
        f"use more calibration samples"
    )


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening_frac: float = DEFAULT_DAMPENING_FRAC,
    layer_name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune `weight` with SparseGPT (Frantar and Alistarh 2023, Algorithm 1).

    Columns are visited left to right in blocks of `block_size`. For each block the mask is
    chosen by the saliency ``w^2 / [H^-1]_jj^2``, or per group of M columns when the sweep
    reaches the group for N:M. Each pruned weight's error is spread over the not yet visited
    columns of its row through the inverse Hessian. The block's accumulated error then updates
    the later blocks in one matrix product (the lazy batch update).

    Args:
        weight: ``[rows, columns]``, not modified.
        hessian: ``[columns, columns]``, the mean of ``x x^T`` over calibration tokens.
        sparsity: fraction of weights to prune, ignored when `pattern` is given.
        pattern: ``(n, m)`` to keep `n` of every `m` consecutive columns per row.
        block_size: columns per lazy-update block.
        dampening_frac: ``lambda`` added to ``diag(H)`` as a fraction of its mean.
        layer_name: used in warnings and errors.

    Returns:
        (new_weight ``[rows, columns]`` in the dtype of `weight`, keep mask bool
        ``[rows, columns]``, dampening_frac actually used).
    """
    hessian = hessian.float().clone()
    # Inputs that were always zero carry no information; a unit diagonal keeps H invertible.
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    # The factorizations are large LAPACK calls, so they run on every thread. Measured on 2
    # cores, moving them off the single thread cut pruning Qwen2.5-0.5B from 91 s to 73 s.
    inverse_factor, dampening_used = _inverse_hessian_factor(hessian, dampening_frac, layer_name)

    # The column sweep is thousands of small tensor operations. With more than one thread each
    # operation pays a parallel-region barrier, which made it 25x slower on a busy 2-core
    # machine (measured: 20 s vs 0.7 s for a 1536 x 576 layer), so the sweep runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        new_weight, keep = _sparsegpt_sweep(weight, inverse_factor, sparsity, pattern, block_size)
    finally:
        torch.set_num_threads(threads)
    return new_weight, keep, dampening_used


def _sparsegpt_sweep(
    weight: torch.Tensor,
    inverse_factor: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` column by column, given the upper Cholesky factor of ``(H + lambda I)^-1``."""
    rows, columns = weight.shape
    work = weight.detach().clone().float()

    pruned = torch.zeros(rows, columns, dtype=torch.bool, device=work.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        count = end - start
        # The block is transposed to [count, rows] so that each column is contiguous in memory.
        block = work[:, start:end].t().contiguous()
        block_inverse = inverse_factor[start:end, start:end]  # [count, count]
        block_errors = torch.zeros_like(block)  # [count, rows]
        diagonal = torch.diagonal(block_inverse)

        if pattern is None:
            # Exact per layer: prune round(s * rows * end) - round(s * rows * start) here.
            quota = round(sparsity * rows * end) - round(sparsity * rows * start)
            block_pruned = _lowest_mask(block**2 / diagonal.reshape(-1, 1) ** 2, quota)
        else:
            block_pruned = torch.zeros_like(block, dtype=torch.bool)
        # error = w / [H^-1]_jj for a pruned weight and 0 for a kept one: one multiplication.
        scale = block_pruned / diagonal.reshape(-1, 1)  # [count, rows]

        for column in range(count):
            if pattern is not None and column % pattern[1] == 0:
                group = slice(column, column + pattern[1])
                saliency = block[group] ** 2 / diagonal[group].reshape(-1, 1) ** 2  # [m, rows]
                block_pruned[group] = nm_pruned(saliency.t(), pattern).t()
                scale[group] = block_pruned[group] / diagonal[group].reshape(-1, 1)
            error = block_errors[column]  # [rows]
            torch.mul(block[column], scale[column], out=error)
            # Spread the error over this and the later columns of the block (the row of H^-1).
            block[column:].addr_(block_inverse[column, column:], error, alpha=-1.0)

        work[:, start:end] = block.t()
        pruned[:, start:end] = block_pruned.t()
        work[:, end:] -= block_errors.t() @ inverse_factor[start:end, end:]

    work[pruned] = 0.0
    return work.to(weight.dtype), ~pruned


def verify_pattern(mask: torch.Tensor, pattern: tuple[int, int]) -> bool:
    """Return True when every group of M consecutive columns keeps at most N weights.

    Args:
        mask: keep mask (or weight: nonzero entries count as kept), ``[rows, columns]``.
    """
    n, m = pattern
    kept = mask != 0 if mask.dtype != torch.bool else mask
    rows, columns = kept.shape
    if columns % m != 0:
        return False
    return bool((kept.reshape(rows, columns // m, m).sum(dim=2) <= n).all())
