"""The Makefile a newcomer starts with: `make run` installs the runtime dependencies only
(the test extra is hundreds of MB) and starts a node; `make test` adds the test extra; each
installs again only when pyproject.toml changes; `make test` fails when our code does not
import or nothing is collected."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nodeproc import REPO, free_ports


def make_env() -> dict[str, str]:
    """No MQ9_* settings, no path to this work tree, nothing from an outer `make test`."""
    drop = ("MQ9_", "PYTHON", "VIRTUAL_ENV", "MAKE", "MFLAGS", "PIP_NO_CACHE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def dry_run(*args: str, cwd: Path = REPO) -> str:
    out = subprocess.run(["make", "-n", *args], cwd=cwd, env=make_env(), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_run_installs_no_test_extra_and_test_does(tmp_path):
    venv = f"VENV={tmp_path / 'venv'}"  # a fresh one: every step shows
    run = dry_run("run", venv)
    assert "pip --disable-pip-version-check install -e .\n" in run
    assert "[test]" not in run and "--quiet" not in run and " -q " not in run
    test = dry_run("test", venv)
    assert "install -e '.[test]'" in test and "pytest" in test
    assert "--quiet" not in test
    assert "python -m mq9.localcluster" in dry_run("cluster", venv)


def copy_tree(dest: Path) -> None:
    """What a fresh clone of this work tree would hold (its uncommitted changes too)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        src = REPO / name
        if src.is_symlink():  # mq9/cluster -> ../cluster
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / name)
        elif src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.timeout(480)  # a cold pip cache downloads everything
def test_make_run_from_a_fresh_clone(tmp_path):
    """`make run` in a fresh tree: a .venv with the runtime dependencies (nats-py among
    them, pytest not), a node that gets ready; a second `make run` does not reinstall, a
    changed pyproject.toml does. pip's cache is the user's (warm on a developer machine)."""
    clone = tmp_path / "mq9"
    clone.mkdir()
    copy_tree(clone)
    port, metrics = free_ports(2)
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["make", "run", f"ARGS=--port {port} --metrics-port {metrics} --cluster-port 0 "
                            f"--gateways 1 --shards 1"],
            cwd=clone, env=make_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while "node_ready" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()[-5000:]
            assert time.monotonic() < deadline, log_path.read_text()[-5000:]
            time.sleep(0.5)
        text = log_path.read_text()
        assert "installing mq9 and its runtime dependencies" in text and "Collecting" in text
        python = clone / ".venv" / "bin" / "python"
        has = lambda mod: subprocess.run([str(python), "-c", f"import {mod}"], cwd=tmp_path,
                                         capture_output=True).returncode == 0  # noqa: E731
        assert has("nats") and has("mq9")
        assert not has("pytest") and not has("locust")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert dry_run("run", cwd=clone).strip() == ".venv/bin/mq9 node"
    (clone / "pyproject.toml").touch()
    assert "install -e ." in dry_run("run", cwd=clone)


@pytest.mark.timeout(300)
def test_make_test_fails_when_code_does_not_import_or_nothing_is_collected(tmp_path):
    """`make test` in a fresh tree whose shard module has a syntax error: the end-to-end
    tests fail (they used to be skipped, and the run was green); a test module that does
    not import and a run that collects nothing fail it too. The virtualenv is this one,
    reached through a wrapper with fresh stamps, so make installs nothing."""
    clone = tmp_path / "mq9"
    clone.mkdir()
    copy_tree(clone)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    for stamp in (".installed-run", ".installed-test"):
        (venv / stamp).touch()

    def make_test(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "test", f"VENV={venv}", "PYTEST_ARGS=" + " ".join(args)],
                              cwd=clone, env=make_env(), capture_output=True, text=True,
                              timeout=240)

    def outcome(r: subprocess.CompletedProcess) -> str:
        return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr

    ok = make_test("tests/test_observability.py")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr
    assert "install" not in ok.stdout.split("pytest")[0]  # the wrapper's venv was used as is

    shard = clone / "mq9" / "shard" / "server.py"
    source = shard.read_text()
    shard.write_text(source + "\ndef broken(:\n")
    unparsable = make_test("tests/test_observability.py")  # ruff stops it before pytest
    assert unparsable.returncode != 0 and "mq9/shard/server.py" in unparsable.stdout, outcome(unparsable)
    # valid Python that fails only when imported: lint passes, the end-to-end tests must fail
    shard.write_text(source + '\nraise RuntimeError("broken on purpose")\n')
    broken = make_test("tests/test_observability.py")
    assert broken.returncode != 0, broken.stdout[-3000:]
    assert "skipped" not in outcome(broken) and "error" in outcome(broken), outcome(broken)

    (clone / "mq9" / "gateway" / "broken_test.py").write_text(
        "from mq9.gateway import no_such_module\n\n\ndef test_it():\n    assert no_such_module\n")
    not_collected = make_test("mq9/gateway/broken_test.py", "tests/test_pyproject.py")
    assert not_collected.returncode != 0
    assert "error" in outcome(not_collected), outcome(not_collected)

    nothing = make_test("tests/test_pyproject.py", "-k", "no_test_is_named_like_this")
    assert nothing.returncode != 0 and "deselected" in outcome(nothing), outcome(nothing)
