"""Tables for `06_results`: MAL, MACs, improvement factors and the paper's headline ratios.

Every table is a ``pandas.DataFrame`` written as CSV and Markdown by `write_table`, one folder
per profile (``results/<profile>/tables/``).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from . import metrics
from .io import atomic_write_text

logger = logging.getLogger(__name__)

# The paper's headline numbers (Lasby et al. 2025, abstract; Llama-3.1-70B target).
PAPER_SD2_OVER_LAYER_PRUNED_MAL = 1.59
PAPER_MAC_REDUCTION_VS_DENSE = 0.4387
PAPER_MAL_LOSS_VS_DENSE = 0.0836

# Decoder shapes of the paper-scale models, from each model's config.json on the Hugging Face
# Hub. Enough to count MACs without downloading any weights.
PAPER_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-70B-Instruct": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-3B-Instruct": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2.5-3B-Instruct": dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}
PAPER_TARGET = "meta-llama/Llama-3.1-70B-Instruct"


def write_table(table: pd.DataFrame, directory: str | Path, name: str, float_format: str = "%.4g") -> Path:
    """Write `table` as ``<name>.csv`` and ``<name>.md`` in `directory`; return the CSV path."""
    directory = Path(directory)
    csv_path = atomic_write_text(directory / f"{name}.csv", table.to_csv(index=False, float_format=float_format))
    atomic_write_text(directory / f"{name}.md", table.to_markdown(index=False, floatfmt=".4g") + "\n")
    return csv_path


def paper_scale_macs_table(sparsity: float = 0.5, context_length: int = 0) -> pd.DataFrame:
    """MACs per token of the paper's target and drafts, dense and sparse, from configs alone.

    The decoder's linear layers are pruned to `sparsity`; `lm_head` stays dense, as in SD².
    `cost_ratio` is the sparse draft's MACs over the target's, the c of the improvement factor.
    """
    target_macs = metrics.count_macs(PAPER_MODEL_CONFIGS[PAPER_TARGET], context_length=context_length).total
    rows = []
    for model, config in PAPER_MODEL_CONFIGS.items():
        dense = metrics.count_macs(config, context_length=context_length)
        sparse = metrics.count_macs(config, sparsity=sparsity, context_length=context_length)
        rows.append({
            "model": model,
            "role": "target" if model == PAPER_TARGET else "draft",
            "dense_gmacs": dense.total / 1e9,
            "sparse_gmacs": sparse.total / 1e9,
            "lm_head_gmacs": dense.lm_head / 1e9,
            "mac_reduction": metrics.mac_reduction(dense, sparse),
            "cost_ratio_dense": dense.total / target_macs,
            "cost_ratio_sparse": sparse.total / target_macs,
        })
    return pd.DataFrame(rows)


def bootstrap_ratio_interval(
    numerator: Sequence[float], denominator: Sequence[float], num_resamples: int = 2000,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(numerator) / mean(denominator) over paired prompts.

    Args:
        numerator, denominator: one value per prompt (e.g. per-prompt MAL of two drafts), paired
            by position.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} and {len(denominator)}")
    if not numerator:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    size = len(numerator)
    ratios = []
    for _ in range(num_resamples):
        picks = [rng.randrange(size) for _ in range(size)]
        top = sum(numerator[i] for i in picks)
        bottom = sum(denominator[i] for i in picks)
        if bottom > 0:
            ratios.append(top / bottom)
    ratios.sort()
    low = ratios[int((1 - level) / 2 * len(ratios))]
    high = ratios[min(len(ratios) - 1, int((1 + level) / 2 * len(ratios)))]
    return (low, high)


# ---------------------------------------------------------------------------------------------
# Tables from the evaluation stage (`05_evaluation`, `sd2 eval`)


def load_summaries(eval_dir: str | Path) -> dict[str, dict]:
    """Read every ``<draft>.summary.json`` in `eval_dir`, keyed by draft name."""
    from .evaluate import SUMMARY_SUFFIX
    from .io import read_json

    summaries = {}
    for path in sorted(Path(eval_dir).glob(f"*{SUMMARY_SUFFIX}")):
        summary = read_json(path)
        summaries[summary.get("draft_name") or path.name.removesuffix(SUMMARY_SUFFIX)] = summary
    if not summaries:
        raise FileNotFoundError(
            f"no evaluation summaries (*{SUMMARY_SUFFIX}) in {eval_dir}; run 05_evaluation or "
            f"`sd2 eval` first"
        )
    return summaries


def per_prompt_mal(eval_dir: str | Path, draft: str) -> dict[str, tuple[int, int]]:
    """Tokens emitted and target forward passes per question of one draft's answer file.

    Returns:
        ``{question_id: (tokens_emitted, target_forward_passes)}`` over all turns.
    """
    from .evaluate import read_answers

    answers = read_answers(Path(eval_dir) / f"{draft}.jsonl")
    counts = {}
    for question_id, answer in answers.items():
        emitted = [n for rounds in answer["rounds"] for n in rounds["emitted"]]
        counts[question_id] = (sum(emitted), len(emitted))
    return counts


def mal_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """MAL overall and per Spec-Bench category group, one row per draft."""
    rows = []
    for name, summary in summaries.items():
        row = {"draft": name, "questions": summary["num_questions"], "mal": summary["mal"],
               "mal_without_last_round": summary["mal_without_last_round"]}
        row.update({f"mal_{group}": value for group, value in summary["mal_per_group"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


def macs_table(summaries: dict[str, dict], dense_draft: str | None) -> pd.DataFrame:
    """Draft MACs per token, the cost ratio c, and the reduction against the dense draft."""
    dense_macs = summaries[dense_draft]["draft_macs_per_token"] if dense_draft in summaries else None
    rows = []
    for name, summary in summaries.items():
        macs = summary["draft_macs_per_token"]
        rows.append({
            "draft": name,
            "draft_gmacs": macs / 1e9,
            "target_gmacs": summary["target_macs_per_token"] / 1e9,
            "cost_ratio": summary["cost_ratio"],
            "mac_reduction_vs_dense": 1 - macs / dense_macs if dense_macs else math.nan,
        })
    return pd.DataFrame(rows)


def improvement_factor_table(summaries: dict[str, dict], ks: Sequence[int] = range(1, 9)) -> pd.DataFrame:
    """Theoretical improvement factor for each K, from each draft's measured acceptance alpha.

    MAL at K comes from the i.i.d. acceptance model, (1 - alpha^(K+1)) / (1 - alpha); the
    factor is that MAL / (K * c + 1). The measured K's own factor is in `speedup_table`.
    """
    rows = []
    for name, summary in summaries.items():
        row = {"draft": name, "alpha": summary["alpha"]}
        for k in ks:
            mal = metrics.expected_mal(summary["alpha"], k)
            row[f"K={k}"] = metrics.improvement_factor(mal, k, summary["cost_ratio"])
        rows.append(row)
    return pd.DataFrame(rows)


def speedup_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """Measured MAL, improvement factor and wall-clock speedup at the evaluated K."""
    rows = []
    for name, summary in summaries.items():
        run = summary["run"]
        rows.append({
            "draft": name,
            "K": run["num_assistant_tokens"],
            "dtype": run["dtype"],
            "mal": summary["mal"],
            "expected_mal_from_alpha": summary.get("expected_mal"),
            "improvement_factor": summary["improvement_factor"],
            "speculative_tokens_per_s": summary["speculative_tokens_per_second"],
            "target_tokens_per_s": summary["target_tokens_per_second"],
            "wall_clock_speedup": summary["speedup"],
            "greedy_mismatches": summary["greedy_mismatches"],
        })
    return pd.DataFrame(rows)


def _paired_mal(eval_dir: Path, first: str, second: str) -> tuple[list[float], list[float]]:
    """Per-question MAL of two drafts on the questions both answered."""
    a, b = per_prompt_mal(eval_dir, first), per_prompt_mal(eval_dir, second)
    shared = sorted(set(a) & set(b))
    return ([a[q][0] / a[q][1] for q in shared], [b[q][0] / b[q][1] for q in shared])


def headline_table(
    eval_dir: str | Path, summaries: dict[str, dict], sd2_draft: str, layer_pruned_draft: str,
    dense_draft: str,
) -> pd.DataFrame:
    """The paper's three headline numbers beside ours, with 95% bootstrap intervals over prompts.

    - SD² MAL / layer-pruned MAL (paper: 1.59x),
    - MAC reduction of the SD² draft against the dense draft (paper: 43.87%),
    - MAL loss of the SD² draft against the dense draft (paper: 8.36%).

    Raises:
        KeyError: a named draft has no summary in `eval_dir`.
    """
    eval_dir = Path(eval_dir)
    missing = [d for d in (sd2_draft, layer_pruned_draft, dense_draft) if d not in summaries]
    if missing:
        raise KeyError(f"no evaluation summary for {', '.join(missing)} in {eval_dir}; "
                       f"evaluated drafts: {', '.join(summaries)}")
    sd2, layer_pruned, dense = (summaries[d] for d in (sd2_draft, layer_pruned_draft, dense_draft))

    sd2_vs_lp = _paired_mal(eval_dir, sd2_draft, layer_pruned_draft)
    sd2_vs_dense = _paired_mal(eval_dir, sd2_draft, dense_draft)
    ratio_low, ratio_high = bootstrap_ratio_interval(*sd2_vs_lp)
    kept_low, kept_high = bootstrap_ratio_interval(*sd2_vs_dense)
    rows = [
        {"metric": "SD² MAL / layer-pruned MAL", "ours": sd2["mal"] / layer_pruned["mal"],
         "ci95_low": ratio_low, "ci95_high": ratio_high,
         "paper": PAPER_SD2_OVER_LAYER_PRUNED_MAL, "prompts": len(sd2_vs_lp[0])},
        {"metric": "MAC reduction vs dense", "ours": 1 - sd2["draft_macs_per_token"] / dense["draft_macs_per_token"],
         "ci95_low": math.nan, "ci95_high": math.nan,
         "paper": PAPER_MAC_REDUCTION_VS_DENSE, "prompts": None},
        {"metric": "MAL loss vs dense", "ours": 1 - sd2["mal"] / dense["mal"],
         "ci95_low": 1 - kept_high, "ci95_high": 1 - kept_low,
         "paper": PAPER_MAL_LOSS_VS_DENSE, "prompts": len(sd2_vs_dense[0])},
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Figures (saved by the notebook through `sd2_utils.figures.save_fig`)


def plot_pareto(summaries: dict[str, dict]):
    """MAL against draft MACs per token for every draft: up and to the left is better."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for name, summary in summaries.items():
        x = summary["draft_macs_per_token"] / 1e9
        ax.scatter(x, summary["mal"], s=45)
        ax.annotate(name, (x, summary["mal"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("draft GMACs per token (non-zero weights)")
    ax.set_ylabel("mean accepted length (MAL)")
    ax.set_title("MAL against draft cost")
    return fig


def plot_improvement_factor(table: pd.DataFrame):
    """Theoretical improvement factor against K, one line per draft."""
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c.startswith("K=")]
    ks = [int(c.removeprefix("K=")) for c in columns]
    fig, ax = plt.subplots()
    for _, row in table.iterrows():
        ax.plot(ks, [row[c] for c in columns], marker="o", label=row["draft"])
    ax.set_xlabel("draft tokens per round, K")
    ax.set_ylabel("theoretical improvement factor")
    ax.legend(fontsize=8)
    return fig
