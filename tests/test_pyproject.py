"""What pyproject.toml promises about installing mq9: bounded dependencies, pysyncobj
pinned, the client commands' nats-py at run time, one version, a license."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import mq9

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def runtime() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_every_runtime_dependency_has_an_upper_bound():
    for name, req in runtime().items():
        ops = {s.operator for s in req.specifier}
        assert ops & {"<", "<=", "==", "~=", "==="}, f"{name} is unbounded: {req}"


def test_pysyncobj_is_pinned_exactly():
    """Members exchange pickles of pysyncobj's objects: a rolling upgrade must not mix
    versions, so the pin is one exact release."""
    (spec,) = runtime()["pysyncobj"].specifier
    assert spec.operator == "==" and re.fullmatch(r"\d+(\.\d+)+", spec.version), spec


def test_client_commands_dependency_is_installed_at_run_time():
    assert "nats-py" in runtime()
    for extra, reqs in PROJECT.get("optional-dependencies", {}).items():
        assert not any(Requirement(r).name == "nats-py" for r in reqs), extra


def test_version_is_written_once():
    """pyproject reads it from mq9/__init__.py; no other file of the package, its tests or
    its build spells it."""
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mq9.__version__"}
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    literal = re.compile(rf"(?<![\w.]){re.escape(mq9.__version__)}(?![\w.])")
    spelled = [p for p in files
               if p.endswith((".py", ".toml", ".cfg", ".txt", "Makefile", "Dockerfile"))
               and p != "mq9/__init__.py" and (ROOT / p).is_file()
               and literal.search((ROOT / p).read_text(errors="replace"))]
    assert not spelled, f"the version {mq9.__version__} is written in {spelled}"


def test_helm_chart_app_version_is_the_package_version():
    """The chart's default image tag follows appVersion; it must name this release."""
    chart = (ROOT / "helm" / "mq9" / "Chart.yaml").read_text()
    app = re.search(r"^appVersion:\s*[\"']?([^\"'\s]+)", chart, re.M).group(1)
    assert app == mq9.__version__


def test_license_is_apache_2():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
