"""The whole SD² pipeline: every notebook, in order, in the smoke profile."""

import json
import math

import pytest

from sd2_utils import notebooks


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    metrics_path = notebooks.reproduce(
        "smoke", run_dir=root / "run", results_dir=root / "results", figures_dir=root / "figures"
    )
    return root, json.loads(metrics_path.read_text())["notebooks"]


def test_smoke_runs_every_notebook(smoke_run):
    root, metrics = smoke_run
    stems = [path.stem for path in notebooks.list_notebooks()]

    assert sorted(metrics) == stems
    for stem in stems:
        assert (root / "results" / "notebooks" / f"{stem}.ipynb").is_file()
        assert (root / "run" / "stages" / f"{stem}.json").is_file()


def test_smoke_greedy_outputs_match_target(smoke_run):
    _, metrics = smoke_run
    mismatches = metrics["06_results"]["greedy_mismatches"]

    assert mismatches
    for draft, count in mismatches.items():
        assert count == 0, f"{draft} changed the target's greedy output"


def test_smoke_writes_tables_and_figures(smoke_run):
    root, metrics = smoke_run
    tables = root / "results" / "tables"

    for name in ("mal_per_group", "macs", "improvement_factor", "speedup", "headline", "paper_scale_macs"):
        assert (tables / f"{name}.csv").is_file()
        assert (tables / f"{name}.md").is_file()
    assert len(list((root / "figures" / "smoke").glob("06_*.png"))) == 4
    headline = metrics["06_results"]
    assert headline["mac_reduction_vs_dense"] > 0.2
    assert not math.isnan(headline["sd2_over_layer_pruned_mal"])
