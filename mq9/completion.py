"""``mq9 completion bash|zsh``: a shell completion script made from ``mq9``'s own argparse
tree, so every command, subcommand and flag (and each flag's choices) is in it without a
second list to keep up to date.

    source <(mq9 completion bash)                 # or save it under bash-completion's dir
    source <(mq9 completion zsh)                  # zsh, through its bashcompinit

The script is a table, one ``case`` per command path: the words to offer there, and per
flag what its value is (a choice, a file, a directory, or nothing to guess).
"""

from __future__ import annotations

import argparse
import shlex
import weakref
from collections.abc import Iterable
from typing import NamedTuple

SHELLS = ("bash", "zsh")
# flags whose value is a path: files, except these directories
_FILE_DESTS = {"config", "auth_file", "tls_cert", "tls_key", "tls_ca", "cluster_secret_file"}
_DIR_DESTS = {"data_dir"}
# words to offer for a flag's value where argparse's choices would be too strict
_OFFERED: weakref.WeakKeyDictionary[argparse.Action, list[str]] = weakref.WeakKeyDictionary()


def offer(action: argparse.Action, words: Iterable[str]) -> None:
    """Offer ``words`` as values of ``action``'s flag (which takes any value)."""
    _OFFERED[action] = [str(w) for w in words]


class ValueKind(NamedTuple):
    """What a flag's value is: "choices" (those in ``choices``), "file", "dir" or "any"."""
    kind: str
    choices: tuple[str, ...] = ()


class Node(NamedTuple):
    """A command path, the words offered after it, and each of its flags' value kinds."""
    path: str
    words: list[str]
    values: dict[str, ValueKind]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def tree(parser: argparse.ArgumentParser, path: str = "mq9") -> list[Node]:
    """The ``Node`` of ``parser`` and of every subparser."""
    subs = _subparsers(parser)
    if path == "mq9" and "cluster" in subs:
        from mq9.cluster import admin  # its flags live in its own parser

        subs["cluster"] = admin.build_parser("mq9 cluster")
    words = list(subs)  # what comes first: subcommands, then a positional's choices, then flags
    flags: list[str] = []
    values: dict[str, ValueKind] = {}
    for action in parser._actions:
        if not action.option_strings:
            if action.choices and not isinstance(action, argparse._SubParsersAction):
                words.extend(str(c) for c in action.choices)  # `mq9 completion bash`
            continue
        flags.extend(action.option_strings)
        if action.nargs == 0:
            continue
        choices = _OFFERED.get(action) or action.choices
        if choices:
            kind = ValueKind("choices", tuple(str(c) for c in choices))
        elif action.dest in _DIR_DESTS:
            kind = ValueKind("dir")
        elif action.dest in _FILE_DESTS or action.metavar == "FILE":
            kind = ValueKind("file")
        else:
            kind = ValueKind("any")
        for opt in action.option_strings:
            values[opt] = kind
    out = [Node(path, words + flags, values)]
    for name, sub in subs.items():
        out.extend(tree(sub, f"{path} {name}"))
    return out


def _q(text: str) -> str:
    return shlex.quote(text)


def bash(parser: argparse.ArgumentParser) -> str:
    nodes = tree(parser)
    paths = [p for p, _, _ in nodes]
    walk = "|".join(_q(p) for p in paths[1:])
    value_cases, word_cases = [], []
    for path, words, values in nodes:
        word_cases.append(f"        {_q(path)}) opts={_q(' '.join(words))} ;;")
        by_kind: dict[ValueKind, list[str]] = {}
        for opt, value in values.items():
            by_kind.setdefault(value, []).append(_q(f"{path} {opt}"))
        for value, pats in by_kind.items():
            action = {"choices": f'COMPREPLY=($(compgen -W {_q(" ".join(value.choices))} -- "$cur"))',
                      "file": 'COMPREPLY=($(compgen -f -- "$cur"))',
                      "dir": 'COMPREPLY=($(compgen -d -- "$cur"))',
                      "any": "COMPREPLY=()"}[value.kind]
            value_cases.append(f"        {'|'.join(pats)}) {action}; return ;;")
    return f"""# mq9 shell completion for bash, made by `mq9 completion bash`.
# Load it with: source <(mq9 completion bash)
_mq9() {{
    # zsh (bashcompinit): arrays indexed from 0 as in bash; `path` would be zsh's $PATH
    [[ -n "${{ZSH_VERSION-}}" ]] && setopt localoptions ksharrays
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" cmd="mq9" i w opts=""
    (( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    # the command path so far: the words before the cursor that name a subcommand
    for (( i = 1; i < COMP_CWORD; i++ )); do
        w="${{COMP_WORDS[i]}}"
        case "$cmd $w" in
        {walk}) cmd="$cmd $w" ;;
        esac
    done
    case "$cmd $prev" in
{chr(10).join(value_cases)}
    esac
    case "$cmd" in
{chr(10).join(word_cases)}
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F _mq9 mq9
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    return ("# mq9 shell completion for zsh, made by `mq9 completion zsh`.\n"
            "# Load it with: source <(mq9 completion zsh)\n"
            "autoload -U +X compinit && compinit\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + bash(parser).split("\n", 2)[2])


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    return {"bash": bash, "zsh": zsh}[shell](parser)
