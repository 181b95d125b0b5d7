"""The conda description and the package metadata name the same direct dependencies."""

import re
import tomllib

import yaml

from sd2_utils.models import PROJECT_ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    declared = {_name(r) for r in pyproject["project"]["dependencies"]}
    declared |= {_name(r) for r in pyproject["project"]["optional-dependencies"]["test"]}
    environment = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(item for item in environment["dependencies"] if isinstance(item, dict))
    listed = {_name(r) for r in pip_section["pip"]}

    assert listed == declared


def test_environment_yml_comments_every_package():
    lines = (PROJECT_ROOT / "environment.yml").read_text().splitlines()
    pip_lines = [line for line in lines if line.strip().startswith("- ") and line.startswith("      ")]

    assert pip_lines
    for line in pip_lines:
        assert "#" in line, f"no comment says why this package is needed: {line.strip()}"
