"""The bash script of ``mq9 completion``, sourced in a real bash and asked what it completes."""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess

import pytest

from mq9 import cli, completion

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def printed(shell: str) -> str:
    """What `mq9 completion SHELL` prints (the command's own code, in this process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["completion", shell]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("completion") / "mq9.bash"
    path.write_text(printed("bash"))
    return str(path)


def complete(script: str, *words: str, cwd=None) -> list[str]:
    """What completing the last of ``words`` offers (``mq9 node --da`` -> words ...)."""
    line = " ".join(words)
    prog = (f'source {script}\n'
            f'COMP_WORDS=({" ".join(_bash_quote(w) for w in words)})\n'
            f'COMP_CWORD={len(words) - 1}\nCOMP_LINE={_bash_quote(line)}\nCOMP_POINT={len(line)}\n'
            '_mq9\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True,
                       text=True, timeout=30, cwd=cwd)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [w for w in r.stdout.splitlines() if w]


def _bash_quote(w: str) -> str:
    return "'" + w.replace("'", "'\\''") + "'"


def test_commands_and_flags(script):
    assert complete(script, "mq9", "mai") == ["mailbox"]
    assert complete(script, "mq9", "node", "--da") == ["--data-dir"]
    assert complete(script, "mq9", "mailbox", "") == ["create", "delete", "list", "-h", "--help"]
    assert complete(script, "mq9", "cluster", "status", "--se") == ["--server"]
    assert complete(script, "mq9", "completion", "") == ["bash", "zsh", "-h", "--help"]
    # a flag's value: its choices, not the command's flags
    assert complete(script, "mq9", "send", "m-1", "--priority", "u") == ["urgent"]
    assert complete(script, "mq9", "node", "--signal", "re") == ["reopen", "reload"]
    assert complete(script, "mq9", "node", "--log-format", "") == ["logfmt", "json"]
    assert complete(script, "mq9", "node", "--port", "") == []
    # words already typed (flags, values) do not move the command path
    assert complete(script, "mq9", "sub", "-q", "w", "--ra") == ["--raw"]


def test_path_flags_complete_files_and_directories(script, tmp_path):
    (tmp_path / "users.toml").write_text("")
    (tmp_path / "data").mkdir()
    assert complete(script, "mq9", "node", "--auth-file", "us", cwd=tmp_path) == ["users.toml"]
    assert complete(script, "mq9", "node", "--data-dir", "", cwd=tmp_path) == ["data"]


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    subs = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            subs = a.choices
    yield path, [o for a in parser._actions for o in a.option_strings], list(subs)
    for name, sub in subs.items():
        yield from _walk(sub, path + [name])


def test_every_command_subcommand_and_flag_is_offered(script):
    from mq9.cluster import admin

    seen = 0
    for path, flags, subs in _walk(cli._parser(), ["mq9"]):
        if path == ["mq9", "cluster"]:  # a stub here: `mq9 cluster` parses with its own parser
            continue
        offered = complete(script, *path, "")
        assert set(flags + subs) <= set(offered), (path, set(flags + subs) - set(offered))
        seen += 1
    for path, flags, subs in _walk(admin.build_parser(), ["mq9", "cluster"]):
        offered = complete(script, *path, "")
        assert set(flags + subs) <= set(offered), (path, set(flags + subs) - set(offered))
    assert seen >= 10


def test_zsh_script_wraps_the_same_table():
    parser = cli._parser()
    z = completion.script("zsh", parser)
    assert "bashcompinit" in z and "complete -o default -F _mq9 mq9" in z
    assert completion.script("bash", parser).split("\n", 2)[2] in z


def _zsh_completes(script: str, typed: str, expect: str) -> str:
    """Type ``typed`` and TAB into an interactive zsh (on a pty) that loaded ``script``;
    returns what the line shows once ``expect`` is on it (or all it got by the deadline)."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: a clean interactive zsh, no user rc files
        os.execvpe("zsh", ["zsh", "-f", "-i"], {"PATH": os.environ["PATH"], "TERM": "dumb",
                                                 "HOME": os.environ.get("HOME", "/tmp")})
    out = b""

    def read_until(mark: bytes, timeout: float = 20.0) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while mark not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    return

    try:
        os.write(fd, f"source {script}; PS1='ready> '; echo loaded\n".encode())
        read_until(b"ready> ")
        out = b""
        os.write(fd, typed.encode() + b"\t")
        read_until(expect.encode())
        return out.decode(errors="replace")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh_completes_through_bashcompinit(tmp_path):
    path = tmp_path / "mq9.zsh"
    path.write_text(printed("zsh"))
    assert "mq9 mailbox " in _zsh_completes(str(path), "mq9 mai", "mq9 mailbox ")
    assert "mq9 node --data-dir " in _zsh_completes(str(path), "mq9 node --da", "--data-dir ")
    assert "--priority urgent " in _zsh_completes(str(path), "mq9 send m --priority u", "urgent ")
