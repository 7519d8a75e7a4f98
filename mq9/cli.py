"""The ``mq9`` command: ``mq9 node [flags]`` runs a node, ``mq9 cluster status|remove``
talks to a cluster's metadata group, ``mq9 health`` checks a local node (for container
health checks), ``mq9 --version``; ``mq9 mailbox|send|pub|sub|query|request`` are client
commands for people (``mq9.tools``).

Every setting of ``mq9.config`` is a flag of ``mq9 node``; ``--help`` shows each one's
``MQ9_*`` variable and default. A bad setting is a one-line error and exit status 2, the
usual status for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mq9 import __version__, config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's default also prints the whole usage block; one line is easier to spot
        # in a container log.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from mq9 import tools

    parser = _Parser(prog="mq9", description="A message broker for AI agents that speaks NATS.",
                     epilog="The client commands (mailbox ... request, bench) take --server URL "
                            "(else MQ9_SERVER, else NATS_URL, else nats://127.0.0.1:4222) after the command. "
                            "`mq9 COMMAND --help` for more.")
    parser.add_argument("--version", action="version", version=f"mq9 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    node = commands.add_parser(
        "node", help="run a node (gateways + storage shards)",
        description="Run an mq9 node. Each flag can also be set by its MQ9_* variable or in "
                    "the --config TOML file; a flag wins over the variable, the variable over "
                    "the file.")
    config.add_arguments(node)
    from mq9 import completion, signals

    completion.offer(node.add_argument("--signal", metavar="SIGNAL[=PID]", help=signals.HELP),
                     signals.SIGNALS)
    commands.add_parser("cluster", help="cluster status / remove a node (see mq9 cluster --help)",
                        add_help=False)
    commands.add_parser("health", help="exit 0 if the node on a data dir is healthy, 1 if not "
                                       "(see mq9 health --help)", add_help=False)
    tools.add_parsers(commands)
    comp = commands.add_parser("completion", help="print a shell completion script",
                               description="Print a completion script for SHELL; load it with "
                                           "`source <(mq9 completion bash)` (or zsh).")
    comp.add_argument("shell", metavar="SHELL", choices=completion.SHELLS, help="bash | zsh")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:
        from mq9.cluster import admin

        return admin.main(argv[1:], prog="mq9 cluster")
    if argv[:1] == ["health"]:
        from mq9 import health

        return health.main(argv[1:])
    parser = _parser()
    ns = parser.parse_args(argv)
    from mq9 import tools

    if ns.command in tools.COMMANDS:
        return tools.run(ns)
    if ns.command == "completion":
        from mq9 import completion

        sys.stdout.write(completion.script(ns.shell, parser))
        return 0
    if ns.command != "node":
        parser.print_help(sys.stderr)
        return 2
    if ns.signal is not None:
        return _send_signal(ns)
    try:
        cfg = config.from_args(ns)
    except ValueError as e:
        print(f"mq9 node: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the --config file
        print(f"mq9 node: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    # Imported here, not at the top: the supervisor must set PROMETHEUS_MULTIPROC_DIR
    # before prometheus_client is first imported, and --help should stay fast.
    from mq9 import node

    try:
        return node.run_node(cfg, args=ns)
    except KeyboardInterrupt:  # Ctrl-C before the supervisor took over SIGINT
        return 130


def _send_signal(ns: argparse.Namespace) -> int:
    from mq9 import signals

    try:
        sig, pid = signals.send(ns.signal, signals.data_dir(ns.data_dir, ns.config))
    except signals.SignalError as e:
        print(f"mq9 node: error: {e}", file=sys.stderr)
        return 1
    print(f"mq9 node: sent {sig.name} to {pid}", file=sys.stderr)
    return 0
