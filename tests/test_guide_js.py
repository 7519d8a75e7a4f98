"""The guide's JavaScript examples (create a mailbox, competing workers with a queue group,
human-in-the-loop with ``for await``) run by Node.js with npm's ``nats`` package (v2) against
a real mq9 node. The script is tests/js/guide.mjs; its dependencies are installed into
tests/js/node_modules once and reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
SECTIONS = ("create_mailbox", "competing_workers", "human_in_the_loop")


@pytest.fixture(scope="module")
def js_deps():
    """npm install into tests/js, unless node_modules already has the nats package."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if not node or not npm:
        pytest.skip("Node.js/npm is not installed; the JavaScript examples cannot run")
    if not os.path.exists(os.path.join(JS_DIR, "node_modules", "nats", "package.json")):
        try:
            r = subprocess.run(
                [npm, "install", "--no-package-lock", "--no-audit", "--no-fund",
                 "--loglevel=error"],
                cwd=JS_DIR, capture_output=True, text=True, timeout=180,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm install of the 'nats' package timed out (no registry access?)")
        if r.returncode != 0:
            pytest.skip(f"npm could not install the 'nats' package: {r.stderr.strip()[-500:]}")
    return node


def test_guide_javascript_examples(js_deps, shared_node):
    r = subprocess.run([js_deps, "guide.mjs", shared_node.url], cwd=JS_DIR,
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    for section in SECTIONS:
        assert f"ok {section}" in r.stdout, f"section {section} did not pass:\n{out}"
    assert r.returncode == 0, out
