import json

import nbformat
import pytest

from sd2_utils import notebooks


def _write_notebook(path, sources):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.cells[0].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_run_notebook_failure_names_cell_and_error(tmp_path):
    notebook = _write_notebook(tmp_path / "01_broken.ipynb", ["X = 1", "y = X + 1", "raise ValueError('bad value 42')"])

    with pytest.raises(notebooks.NotebookExecutionError, match=r"01_broken.ipynb failed in cell 2 \(\"raise ValueError.*ValueError: bad value 42"):
        notebooks.run_notebook(notebook, {"X": 2}, tmp_path / "out.ipynb", {})


def test_record_metrics_merges_keys(tmp_path):
    notebooks.record_metrics(tmp_path, "05_evaluation", {"mal": 2.5})
    notebooks.record_metrics(tmp_path, "05_evaluation", {"macs": 10})

    stored = json.loads((tmp_path / "metrics" / "05_evaluation.json").read_text())
    assert stored == {"mal": 2.5, "macs": 10}


def test_unknown_profile_lists_choices():
    with pytest.raises(FileNotFoundError, match="profile 'huge' not found.*smoke"):
        notebooks.load_profile("huge")


def test_unknown_notebook_selection_is_rejected():
    with pytest.raises(ValueError, match="no notebook matches 99_missing"):
        notebooks._select(notebooks.list_notebooks(), ["99_missing"])


def test_profiles_name_existing_notebooks():
    stems = {path.stem for path in notebooks.list_notebooks()}
    for profile in ("smoke", "cpu", "paper"):
        settings = notebooks.load_profile(profile)
        sections = set(settings) - set(notebooks.PROFILE_META_KEYS)
        assert sections <= stems, f"profiles/{profile}.yaml has sections for missing notebooks"


def test_setup_notebook_runs_in_smoke_profile(tmp_path):
    run_dir, results_dir = tmp_path / "run", tmp_path / "results"

    metrics_path = notebooks.reproduce("smoke", only=["00"], run_dir=run_dir,
                                       results_dir=results_dir, figures_dir=tmp_path / "figures")

    metrics = json.loads(metrics_path.read_text())["notebooks"]["00_setup"]
    assert metrics["dataset_rows"]["spec_bench"] == 480
    assert metrics["models"]["Qwen/Qwen2.5-Coder-1.5B-Instruct"]["layers"] == 28
    assert (results_dir / "notebooks" / "00_setup.ipynb").is_file()
    # A rerun with the same settings skips the finished notebook.
    stage_record = run_dir / "stages" / "00_setup.json"
    finished = stage_record.read_text()
    notebooks.reproduce("smoke", only=["00"], run_dir=run_dir, results_dir=results_dir)
    assert stage_record.read_text() == finished
