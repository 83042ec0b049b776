"""environment.yml must describe the same environment as pyproject.toml."""

import tomllib

import yaml

from ema_utils.core.paths import PROJECT_ROOT


def _pyproject_requirements():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return reqs


def _environment_requirements():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one pip: section"
    return pip_lists[0], env


def test_environment_yml_mirrors_pyproject():
    pip_reqs, env = _environment_requirements()
    ours = sorted(_pyproject_requirements())
    theirs = sorted(pip_reqs)
    assert theirs == ours, (
        "environment.yml and pyproject.toml disagree.\n"
        f"only in pyproject.toml: {sorted(set(ours) - set(theirs))}\n"
        f"only in environment.yml: {sorted(set(theirs) - set(ours))}"
    )
    assert "python=3.11" in env["dependencies"]


def test_every_dependency_is_pinned():
    loose = [r for r in _pyproject_requirements() if "==" not in r and "<" not in r]
    assert not loose, f"unpinned dependencies in pyproject.toml: {loose}"
    assert "torch==2.13.0" in _pyproject_requirements(), "torch must stay pinned to the CPU file"


def test_asset_requirements_are_hash_pinned():
    lines = [l for l in (PROJECT_ROOT / "requirements-assets.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert len(lines) >= 7
    for line in lines:
        assert "==" in line and "--hash=sha256:" in line, f"not pinned by version and hash: {line}"
