import math

import pytest

from sd2_utils import results
from sd2_utils.evaluate import evaluate_drafts
from tests.conftest import SMOLLM_ID


def test_paper_macs_llama_3b_reduction():
    table = results.paper_scale_macs_table(sparsity=0.5).set_index("model")

    assert table.loc["meta-llama/Llama-3.2-3B-Instruct", "mac_reduction"] == pytest.approx(0.4387, abs=5e-5)
    assert table.loc[results.PAPER_TARGET, "cost_ratio_dense"] == 1.0
    assert table.loc["meta-llama/Llama-3.2-1B-Instruct", "sparse_gmacs"] < table.loc[
        "meta-llama/Llama-3.2-1B-Instruct", "dense_gmacs"]


def test_bootstrap_interval_brackets_ratio_of_means():
    numerator = [2.0, 3.0, 2.5, 4.0, 3.5, 2.0]
    denominator = [1.5, 2.0, 2.0, 2.5, 2.0, 1.5]
    point = sum(numerator) / sum(denominator)

    low, high = results.bootstrap_ratio_interval(numerator, denominator, seed=1)

    assert low < point < high
    assert results.bootstrap_ratio_interval([2.0] * 4, [1.0] * 4) == (2.0, 2.0)


def test_bootstrap_interval_rejects_unpaired_samples():
    with pytest.raises(ValueError, match="paired samples differ in length: 2 and 3"):
        results.bootstrap_ratio_interval([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """A real evaluation: SmolLM2 drafting for itself under three names, two questions."""
    directory = tmp_path_factory.mktemp("eval")
    drafts = [{"name": name, "path": SMOLLM_ID} for name in ("dense", "sd2", "layer-pruned")]
    evaluate_drafts(SMOLLM_ID, drafts, "spec-bench", directory, max_questions=2,
                    max_new_tokens=8, num_assistant_tokens=3)
    return directory


def test_tables_cover_every_evaluated_draft(eval_dir, tmp_path):
    summaries = results.load_summaries(eval_dir)

    mal = results.mal_table(summaries)
    macs = results.macs_table(summaries, "dense")
    factors = results.improvement_factor_table(summaries, ks=[1, 4])

    assert sorted(mal["draft"]) == ["dense", "layer-pruned", "sd2"]
    assert (mal["mal"] >= 1).all()
    assert macs.set_index("draft").loc["sd2", "mac_reduction_vs_dense"] == pytest.approx(0.0)
    assert list(factors.columns) == ["draft", "alpha", "K=1", "K=4"]
    csv_path = results.write_table(mal, tmp_path, "mal")
    assert csv_path.read_text().startswith("draft,")
    assert (tmp_path / "mal.md").read_text().startswith("| draft")


def test_headline_of_identical_drafts_is_neutral(eval_dir):
    summaries = results.load_summaries(eval_dir)

    headline = results.headline_table(eval_dir, summaries, "sd2", "layer-pruned", "dense").set_index("metric")

    assert headline.loc["SD² MAL / layer-pruned MAL", "ours"] == pytest.approx(1.0)
    assert headline.loc["MAL loss vs dense", "ours"] == pytest.approx(0.0)
    assert headline.loc["SD² MAL / layer-pruned MAL", "paper"] == 1.59
    assert not math.isnan(headline.loc["SD² MAL / layer-pruned MAL", "ci95_low"])


def test_headline_names_missing_draft(eval_dir):
    summaries = results.load_summaries(eval_dir)

    with pytest.raises(KeyError, match="no evaluation summary for qwen-ft"):
        results.headline_table(eval_dir, summaries, "qwen-ft", "layer-pruned", "dense")


def test_load_summaries_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run 05_evaluation or `sd2 eval` first"):
        results.load_summaries(tmp_path)
