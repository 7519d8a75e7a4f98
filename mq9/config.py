"""Node configuration: one table of settings, read from flags, ``MQ9_*`` variables and an
optional TOML file.

Precedence: command-line flag > environment variable > config file > default. Each setting's
flag is its name with dashes (``--data-dir``), its variable the same in capitals
(``MQ9_DATA_DIR``) and its config-file key the name with underscores (``data_dir``).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, TypeVar

MIB = 1024 * 1024


_T = TypeVar("_T")


def _opt(default: _T, help: str, **kw: object) -> _T:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    host: str = _opt("0.0.0.0", "address the NATS port listens on")
    port: int = _opt(4222, "NATS client port, shared by all gateway processes (SO_REUSEPORT)")
    metrics_port: int = _opt(9090, "Prometheus /metrics port (0 = off)")
    data_dir: str = _opt("./mq9-data", "where shards keep their RocksDB databases")
    gateways: int = _opt(0, "gateway processes (0 = one per CPU)")
    shards: int = _opt(2, "storage shard processes, one RocksDB each")
    cluster_port: int = _opt(6222, "metadata-group (Raft) port, used in cluster mode (--join, "
                                   "--advertise, or a data dir of a member); data ports follow it "
                                   "(shard i: +1+i, gateway j: +1+shards+j); 0 = never cluster")
    node_id: str | None = _opt(None, "this node's name in the cluster (default: kept in the data dir)")
    advertise: str | None = _opt(None, "host other nodes use to reach this one; giving it starts the "
                                       "first node of a cluster (joiners default to --host, or this "
                                       "machine's address when --host is 0.0.0.0)")
    join: str | None = _opt(None, "HOST:PORT of any cluster member's --cluster-port, to join its cluster")
    no_advertise: bool = _opt(False, "leave the cluster's client URLs out of INFO connect_urls "
                                     "(nats-server's no_advertise), for clients that cannot "
                                     "reach the members' --advertise hosts")
    rejoin: bool = _opt(False, "let a node that `mq9 cluster remove` took out join again (its old "
                               "cluster data is wiped); without it a removed node stays out, idle")
    cluster_secret: str | None = _opt(None, "secret shared by the members of a cluster, at least 16 "
                                            "characters (e.g. `openssl rand -hex 32`); required in "
                                            "cluster mode: it encrypts and authenticates Raft and "
                                            "control traffic and keys ZeroMQ CURVE on the data ports")
    cluster_secret_file: str | None = _opt(None, "file whose first line is the cluster secret "
                                                 "(a mounted Secret), instead of --cluster-secret")
    max_payload: int = _opt(MIB, "largest message body accepted, bytes")
    max_connections: int = _opt(65536, "client connections per node")
    max_control_line: int = _opt(4096, "longest protocol line, bytes")
    max_pending: int = _opt(64 * MIB, "bytes queued for one slow client before it is cut off")
    max_msgs: int = _opt(10000, "messages one mailbox holds")
    default_ttl: int = _opt(86400, "mailbox TTL when CREATE names none, seconds")
    ping_interval: float = _opt(120.0, "seconds between server PINGs to a client")
    max_pings_out: int = _opt(2, "unanswered PINGs before a client is dropped as stale")
    auth_timeout: float = _opt(2.0, "seconds a client has to send CONNECT when auth is on")
    fsync: str = _opt("never", "fsync RocksDB's WAL per write batch: never | batch",
                      choices=("never", "batch"))
    auth_token: str | None = _opt(None, "require this token in CONNECT")
    user: str | None = _opt(None, "require this user in CONNECT (with --pass)")
    password: str | None = _opt(None, "password for --user", flag="--pass", env="MQ9_PASS")
    auth_file: str | None = _opt(None, "users, passwords (plain or bcrypt $2a$...) and per-user publish/"
                                       "subscribe permissions, as nats-server's authorization "
                                       "block; TOML, or JSON when the name ends in .json (see README)")
    max_subscriptions: int = _opt(0, "subscriptions one connection may hold (0 = unlimited)")
    tls_cert: str | None = _opt(None, "PEM certificate (chain) of the server; with --tls-key, clients "
                                      "must use TLS (INFO says tls_required)")
    tls_key: str | None = _opt(None, "PEM private key for --tls-cert")
    tls_ca: str | None = _opt(None, "PEM CA bundle that client certificates are verified against")
    tls_verify: bool = _opt(False, "require a client certificate signed by --tls-ca")
    tls_timeout: float = _opt(2.0, "seconds a client has to complete the TLS handshake")
    tls_handshake_first: bool = _opt(False, "TLS handshake before INFO (nats-server's handshake_first; "
                                            "clients must ask for it, e.g. nats-py tls_handshake_first)")
    lame_duck_duration: float = _opt(120.0, "seconds over which lame-duck mode (SIGUSR2) closes the "
                                            "clients, grace period included (nats-server's default)")
    lame_duck_grace_period: float = _opt(10.0, "seconds lame-duck mode waits before it starts "
                                               "closing clients (nats-server's default)")
    server_name: str | None = _opt(None, "name in INFO (default: mq9-<hostname>)")
    log_level: str = _opt("info", "debug | info | warning | error",
                          choices=("debug", "info", "warning", "error"))
    log_format: str = _opt("logfmt", "log lines as logfmt or as one JSON object each: logfmt | json",
                           choices=("logfmt", "json"))
    config: str | None = _opt(None, "TOML file with any of these settings")

    @property
    def gateway_count(self) -> int:
        from mq9 import cpus

        return self.gateways or cpus.usable()

    @property
    def run_dir(self) -> str:
        """Sockets and per-process metric files live here; recreated at each start."""
        return os.path.join(os.path.abspath(self.data_dir), "run")


def _flag(f: Field[Any]) -> str:
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


def _env(f: Field[Any]) -> str:
    return str(f.metadata.get("env", "MQ9_" + f.name.upper()))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


# int() and float() refuse what they cannot read (a TOML table, "abc") with TypeError or
# ValueError, which ``from_args`` reports with the setting's name.
_CONVERTERS: dict[str, Callable[[Any], int | float | str]] = {"int": int, "float": float, "str": str}


def _convert(f: Field[Any], raw: object) -> bool | int | float | str | None:
    if raw is None:
        return None
    if f.type in (bool, "bool"):
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in _TRUE:
            return True
        if str(raw).lower() in _FALSE:
            return False
        raise ValueError(raw)
    base = f.type if isinstance(f.type, type) else f.type.split("|")[0].strip()
    conv = _CONVERTERS.get(base if isinstance(base, str) else base.__name__, str)
    return conv(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Config):
        if f.type in (bool, "bool"):  # a switch: --tls-verify, MQ9_TLS_VERIFY=1, tls_verify = true
            parser.add_argument(_flag(f), dest=f.name, default=None, action="store_const", const=True,
                                help=f"{f.metadata['help']} [env {_env(f)}=1; default off]")
            continue
        parser.add_argument(
            _flag(f), dest=f.name, default=None, metavar=f.name.upper(),
            choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} [env {_env(f)}; default {f.default}]",
        )


def from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    env: Mapping[str, str] = os.environ if environ is None else environ
    cli = {f.name: getattr(ns, f.name, None) for f in fields(Config)}
    config_path = cli.get("config") or env.get("MQ9_CONFIG")
    from_file: dict[str, Any] = {}  # whatever TOML holds; _convert checks it
    if config_path:
        with open(config_path, "rb") as fh:
            from_file = {k.replace("-", "_"): v for k, v in tomllib.load(fh).items()}
        unknown = set(from_file) - {f.name for f in fields(Config)}
        if unknown:
            raise ValueError(f"unknown settings in {config_path}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}  # each converted to its own field's type by _convert
    for f in fields(Config):
        sources = ((cli[f.name], _flag(f)), (env.get(_env(f)), _env(f)),
                   (from_file.get(f.name), f"{f.name} in {config_path}"))
        for raw, where in sources:
            if raw is not None:
                if where == _env(f):
                    _refuse_service_link(where, raw)
                try:
                    values[f.name] = _convert(f, raw)
                except (TypeError, ValueError):
                    # int("abc")'s own message does not say which setting was wrong
                    raise ValueError(f"{where}: not a valid {f.type.split('|')[0].strip()}: {raw!r}") from None
                break
    cfg = Config(**values)
    choices = {f.name: f.metadata.get("choices") for f in fields(Config)}
    for name, allowed in choices.items():
        if allowed and getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}")
    if (cfg.user is None) != (cfg.password is None):
        raise ValueError("--user and --pass go together")
    cfg.cluster_secret = _cluster_secret(cfg)
    _check_ranges(cfg)
    _check_security(cfg)
    return cfg


def _refuse_service_link(name: str, raw: str) -> None:
    """Kubernetes gives every pod ``{SERVICE}_PORT=tcp://IP:PORT`` for each Service in its
    namespace (service links); for a Service named ``mq9`` that is ``MQ9_PORT``, which would
    otherwise fail as "not a valid int" without saying where it came from."""
    if isinstance(raw, str) and raw.lower().startswith(("tcp://", "udp://", "sctp://")):
        raise ValueError(f"{name}={raw} is not an mq9 setting but a Kubernetes service link (a "
                         "Service named like the variable's prefix); set enableServiceLinks: false "
                         "in the pod spec, or give the setting as a flag")


MIN_SECRET = 16


def _cluster_secret(cfg: Config) -> str | None:
    secret = cfg.cluster_secret
    if cfg.cluster_secret_file:
        if secret:
            raise ValueError("give the cluster secret once: "
                             "--cluster-secret or --cluster-secret-file")
        try:
            with open(cfg.cluster_secret_file, encoding="utf-8") as f:
                secret = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--cluster-secret-file {cfg.cluster_secret_file}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    secret = secret or None  # MQ9_CLUSTER_SECRET="" (an unset compose variable) is no secret
    if secret is not None and len(secret) < MIN_SECRET:
        # Traffic sealed with it can be attacked offline, one guess at a time.
        raise ValueError(f"the cluster secret must be at least {MIN_SECRET} characters")
    return secret


def _check_security(cfg: Config) -> None:
    """Read the auth file and build the TLS context once here, so that a bad file is a
    one-line error at start, not a crash in every gateway process."""
    if cfg.auth_file is not None:
        if cfg.auth_token or cfg.user:
            raise ValueError("--auth-file replaces --auth-token and --user/--pass; give one")
        from mq9.gateway import auth
        auth.load(cfg.auth_file)
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if cfg.tls_cert is None and (cfg.tls_ca or cfg.tls_verify or cfg.tls_handshake_first):
        raise ValueError("--tls-ca, --tls-verify and --tls-handshake-first need --tls-cert and --tls-key")
    if cfg.tls_verify and not cfg.tls_ca:
        raise ValueError("--tls-verify needs --tls-ca (the CA that signs client certificates)")
    if cfg.tls_cert is not None:
        from mq9.gateway import tls
        tls.server_context(cfg)


# (setting, lowest, highest): values outside would only fail later, inside a child process
_RANGES = (
    ("port", 1, 65535), ("metrics_port", 0, 65535), ("cluster_port", 0, 65535),
    ("gateways", 0, 1024), ("shards", 1, 1024), ("max_payload", 1, None),
    ("max_connections", 1, None), ("max_control_line", 1, None), ("max_pending", 1, None),
    ("max_msgs", 1, None), ("default_ttl", 0, None), ("ping_interval", 0.001, None),
    ("max_pings_out", 1, None), ("auth_timeout", 0.001, None), ("max_subscriptions", 0, None),
    ("tls_timeout", 0.001, None), ("lame_duck_duration", 0.001, None),
    ("lame_duck_grace_period", 0, None),
)


def _check_ranges(cfg: Config) -> None:
    by_name = {f.name: f for f in fields(Config)}
    for name, lo, hi in _RANGES:
        value = getattr(cfg, name)
        if value < lo or (hi is not None and value > hi):
            limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"{_flag(by_name[name])} must be {limit}, got {value}")
    if cfg.lame_duck_grace_period >= cfg.lame_duck_duration:
        # as nats-server refuses it: the clients would all be closed at once
        raise ValueError("--lame-duck-grace-period must be less than --lame-duck-duration")
