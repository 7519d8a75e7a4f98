"""The README's first steps, as a newcomer copies them: the `mq9` commands of "First
success" and the demo of "The guide's demo in Python", run against a real node."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from nodeproc import REPO, child_env

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text: str, lang: str) -> list[str]:
    """The fenced blocks of ``text`` whose opening fence names ``lang`` ("" for none)."""
    found, current = [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current = (line[3:].strip(), [])
            else:
                if current[0] == lang:
                    found.append("".join(current[1]))
                current = None
        elif current is not None:
            current[1].append(line)
    return found


def test_first_success_commands(node):
    commands = [line for line in blocks(section("First success"), "sh")[0].splitlines()
                if line.startswith(".venv/bin/mq9 ")]
    assert len(commands) >= 4
    outputs = []
    for line in commands:
        args = shlex.split(line)[1:]
        p = subprocess.run([sys.executable, "-m", "mq9", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=30, env=child_env({"MQ9_SERVER": node.url}))
        assert p.returncode == 0 and "Traceback" not in p.stderr, (line, p.stderr)
        outputs.append(p.stdout)
    shown = blocks(section("First success"), "")[0]
    # what the README shows, but for the token, the times and the elided lines
    for got in outputs[1:]:
        for line in got.splitlines():
            line = re.sub(r"\d\d:\d\d:\d\d\.\d{3}", "15:38:35.259", line)
            assert line in shown, (line, shown)
    assert outputs[0].startswith("Created standard mailbox\n  mail_id  agent-b\n")


def test_guide_demo(node):
    (demo,) = [b for b in blocks(section("The guide's demo in Python"), "python")
               if b.startswith("# demo.py")]
    assert "nats://localhost:4222" in demo
    run = blocks(section("The guide's demo in Python"), "sh")[0]
    assert run.startswith(".venv/bin/python demo.py")
    expected = run.split("#", 1)[1].strip()
    p = subprocess.run([sys.executable, "-c", demo.replace("nats://localhost:4222", node.url)],
                       capture_output=True, text=True, timeout=30, env=child_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == expected
