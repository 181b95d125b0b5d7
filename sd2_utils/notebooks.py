"""Run the numbered notebooks with papermill, one profile at a time, and gather their metrics.

A profile (``profiles/<name>.yaml``) contains a section per notebook, keyed by the notebook's
stem (``05_evaluation``). The runner injects that section, plus ``PROFILE``, ``RUN_DIR``
(stage artifacts) and ``RESULTS_DIR`` (tables), into the cell tagged ``parameters``. Each
notebook records its headline numbers with `record_metrics`; the runner gathers them into
``results/<profile>/metrics.json``.

A notebook that finished with the same parameters and the same source is skipped on a rerun
(its stage record lives in ``RUN_DIR/stages/``); ``force`` reruns named stages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from .io import atomic_write_json, read_json
from .models import PROJECT_ROOT

logger = logging.getLogger(__name__)

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
PROFILES_DIR = PROJECT_ROOT / "profiles"
RESULTS_DIR = PROJECT_ROOT / "results"
RUNS_DIR = PROJECT_ROOT / "data" / "runs"
NOTEBOOK_PATTERN = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
# Keys of a profile file that describe the profile rather than a notebook.
PROFILE_META_KEYS = ("description", "expected_runtime", "notebooks")
# Parameters the runner adds to every notebook that declares them.
RUNNER_PARAMETERS = ("RESULTS_DIR",)


class NotebookExecutionError(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the error."""


def list_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"profile {name!r} not found in {PROFILES_DIR}; choose one of {', '.join(list_profiles())}"
        )
    profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(profile, dict):
        raise ValueError(f"{path} must hold a mapping of notebook stems to parameters")
    return profile


def list_notebooks(directory: Path = NOTEBOOKS_DIR) -> list[Path]:
    """Return the numbered notebooks (``NN_name.ipynb``) in execution order."""
    return sorted(p for p in directory.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))


def notebook_parameters(
    profile_name: str, stem: str, run_dir: Path, results_dir: Path | None = None
) -> dict[str, Any]:
    """Build the parameters papermill injects into notebook `stem` for a profile."""
    profile = load_profile(profile_name)
    section = profile.get(stem) or {}
    if not isinstance(section, dict):
        raise ValueError(f"profiles/{profile_name}.yaml: section {stem!r} must be a mapping")
    results_dir = results_dir or RESULTS_DIR / profile_name
    return {"PROFILE": profile_name, "RUN_DIR": str(run_dir), "RESULTS_DIR": str(results_dir), **section}


def record_metrics(run_dir: str | os.PathLike, notebook: str, metrics: dict[str, Any]) -> Path:
    """Store a notebook's headline numbers as ``RUN_DIR/metrics/<notebook>.json``.

    Values must be JSON-serializable. A second call for the same notebook updates its keys.
    """
    path = Path(run_dir) / "metrics" / f"{notebook}.json"
    merged = {**(read_json(path, default={}) or {}), **metrics}
    json.dumps(merged)  # Fail here, naming no file yet, rather than leave a half-written record.
    return atomic_write_json(path, merged)


def gather_metrics(run_dir: Path, results_dir: Path, profile: str) -> Path:
    """Merge every notebook's metrics into ``results_dir/metrics.json``."""
    gathered = {"profile": profile, "notebooks": {}}
    for path in sorted((run_dir / "metrics").glob("*.json")):
        gathered["notebooks"][path.stem] = read_json(path)
    return atomic_write_json(results_dir / "metrics.json", gathered)


def _fingerprint(notebook: Path, parameters: dict[str, Any]) -> str:
    digest = hashlib.sha256(notebook.read_bytes())
    digest.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def run_notebook(
    notebook: Path, parameters: dict[str, Any], output_path: Path, environment: dict[str, str]
) -> None:
    """Execute one notebook with papermill.

    Raises:
        NotebookExecutionError: a cell raised, or the kernel died.
    """
    import papermill
    from nbclient.exceptions import DeadKernelError

    output_path.parent.mkdir(parents=True, exist_ok=True)
    declared = papermill.inspect_notebook(str(notebook))
    # RESULTS_DIR goes only to notebooks that declare it, so papermill's warning about unknown
    # parameters still flags a misspelled key in a profile.
    parameters = {k: v for k, v in parameters.items() if k in declared or k not in RUNNER_PARAMETERS}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)  # The kernel inherits the runner's environment.
    try:
        papermill.execute_notebook(
            str(notebook), str(output_path), parameters=parameters, cwd=str(notebook.parent),
            kernel_name="python3", progress_bar=True, log_output=False,
        )
    except papermill.PapermillExecutionError as error:
        first_line = (error.source or "").strip().splitlines()[:1]
        raise NotebookExecutionError(
            f"{notebook.name} failed in cell {_source_cell_index(notebook, error.cell_index, parameters)}"
            f" ({first_line[0] if first_line else 'empty cell'!r}): {error.ename}: {error.evalue}; "
            f"the executed copy with the traceback is {output_path}"
        ) from None
    except DeadKernelError as error:
        raise NotebookExecutionError(
            f"{notebook.name}: the kernel died ({error}); it may have run out of memory. The "
            f"partly executed copy is {output_path}"
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _source_cell_index(notebook: Path, executed_index: int, parameters: dict) -> int:
    """Map a cell index of the executed copy back to the source notebook.

    Papermill inserts one cell of injected parameters after the cell tagged `parameters`.
    """
    import nbformat

    if not parameters:
        return executed_index
    cells = nbformat.read(notebook, as_version=4).cells
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    injected_at = tagged[0] + 1 if tagged else 0
    return executed_index - 1 if executed_index > injected_at else executed_index


def reproduce(
    profile: str,
    only: Iterable[str] | None = None,
    force: Iterable[str] = (),
    run_dir: Path | None = None,
    results_dir: Path | None = None,
    figures_dir: Path | None = None,
) -> Path:
    """Execute the profile's notebooks in order and return the path of its ``metrics.json``.

    Args:
        profile: name of a file in ``profiles/``.
        only: notebook stems or number prefixes to run (default: the profile's list, or all).
        force: stems or prefixes to rerun even when their stage record marks them done;
            ``all`` reruns every notebook.
        run_dir: where stages write artifacts (default ``data/runs/<profile>``).
        results_dir: where executed notebooks and ``metrics.json`` go (default ``results/<profile>``).
        figures_dir: root of the figures folder (default ``figures/``).
    """
    settings = load_profile(profile)
    run_dir = Path(run_dir or RUNS_DIR / profile).resolve()
    results_dir = Path(results_dir or RESULTS_DIR / profile).resolve()
    notebooks = _select(list_notebooks(), only or settings.get("notebooks"))
    force = set(force)
    environment = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if figures_dir is not None:
        environment["SD2_FIGURES_DIR"] = str(Path(figures_dir).resolve())

    upstream_ran = False
    for position, notebook in enumerate(notebooks, start=1):
        stem = notebook.stem
        parameters = notebook_parameters(profile, stem, run_dir, results_dir)
        fingerprint = _fingerprint(notebook, parameters)
        stage_record = run_dir / "stages" / f"{stem}.json"
        done = read_json(stage_record, default={}) or {}
        forced = "all" in force or any(_matches(stem, name) for name in force)
        # A stage whose inputs were just rebuilt reruns too, whatever its own record shows.
        if done.get("fingerprint") == fingerprint and not forced and not upstream_ran:
            logger.info("[%d/%d] %s: done with these settings, skipped", position, len(notebooks), stem)
            continue
        logger.info("[%d/%d] %s: running (profile %s)", position, len(notebooks), stem, profile)
        started = time.perf_counter()
        run_notebook(notebook, parameters, results_dir / "notebooks" / notebook.name, environment)
        elapsed = time.perf_counter() - started
        upstream_ran = True
        atomic_write_json(stage_record, {"fingerprint": fingerprint, "seconds": round(elapsed, 1),
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        logger.info("[%d/%d] %s: finished in %.0f s", position, len(notebooks), stem, elapsed)

    metrics_path = gather_metrics(run_dir, results_dir, profile)
    _record_stage_times(run_dir, results_dir, notebooks)
    logger.info("Metrics of profile %s: %s", profile, metrics_path)
    return metrics_path


def _record_stage_times(run_dir: Path, results_dir: Path, notebooks: list[Path]) -> None:
    times = {}
    for notebook in notebooks:
        record = read_json(run_dir / "stages" / f"{notebook.stem}.json", default=None)
        if record:
            times[notebook.stem] = record["seconds"]
    atomic_write_json(results_dir / "stage_seconds.json", times)


def _matches(stem: str, name: str) -> bool:
    return stem == name or stem.split("_", 1)[0] == name or stem.startswith(name)


def _select(notebooks: list[Path], names: Iterable[str] | None) -> list[Path]:
    if not names:
        return notebooks
    names = list(names)
    unknown = [name for name in names if not any(_matches(nb.stem, name) for nb in notebooks)]
    if unknown:
        raise ValueError(
            f"no notebook matches {', '.join(unknown)}; available: "
            f"{', '.join(nb.stem for nb in notebooks)}"
        )
    return [nb for nb in notebooks if any(_matches(nb.stem, name) for name in names)]


def _reproduce_command(args: argparse.Namespace) -> int:
    path = reproduce(args.profile, only=args.notebooks or None, force=args.force or ())
    print(f"metrics: {path}")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="run the numbered notebooks for a profile and gather their metrics"
    )
    parser.add_argument("--profile", default="cpu", help="profile in profiles/ (smoke, cpu, paper)")
    parser.add_argument("--notebooks", nargs="*", metavar="STAGE",
                        help="run only these notebooks (stem or number, e.g. 00 05_evaluation)")
    parser.add_argument("--force", action="append", metavar="STAGE",
                        help="rerun a finished stage (stem, number, or `all`); repeatable")
    parser.set_defaults(func=_reproduce_command)
