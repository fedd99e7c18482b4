"""Node configuration: TOML file -> validated, typed settings.

Every key is declared once here, with its type and default; an unknown key or a
value of the wrong type is a :class:`ConfigError` that names the key and the file,
so a PACS admin sees exactly which line to fix.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dicomnode.credentials import Credential, parse
from dicomnode.tls import TlsError, TlsSettings, client_context, server_context
from pipelines.errors import ModelError
from pipelines.model_folder import read_model_info
from pipelines.routing import Route, RoutingError, parse_routes
from pipelines.settings import InferenceSettings

ENV_CONFIG = "DICOMNODE_CONFIG"
DEFAULT_CONFIG = Path("conf/node.toml")
# The checkout's shipped config, for commands run outside the checkout (``dicomnode status``
# from a home folder talks to the node that ``dicomnode serve`` started from the checkout).
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / DEFAULT_CONFIG


class ConfigError(ValueError):
    """A configuration problem, phrased for the person editing the file."""


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "HARMONISE"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: Path = Path("var")
    series_timeout: float = 10.0
    models_dir: Path = Path("models")
    accept_any_loopback: bool = True
    require_called_aet: bool = True  # reject associations addressed to another AE title
    max_associations: int = 10  # counted from complete association requests
    max_handshakes_per_host: int = 8  # unfinished handshakes (connections) from one host
    max_handshakes: int = 64  # unfinished handshakes from all hosts
    max_pdu_size: int = 1_048_576  # 0 = unlimited; large PDUs = fewer messages per image
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    disk_reserve_mb: int = 500
    duplicate_policy: str = "replace"  # replace | keep-first
    unmatched: str = "archive"  # archive | ignore
    log_level: str = "info"
    sweep_interval: float = 1.0
    write_sr: bool = False  # also archive (and send) an algorithm SR per harmonised series
    max_job_attempts: int = 3  # a job interrupted this often (e.g. killed for memory) fails


@dataclass(frozen=True)
class OutboxSettings:
    retry_initial: float = 5.0
    retry_max_interval: float = 600.0
    max_age_hours: float = 72.0
    poll_interval: float = 1.0  # seconds between looks for sends that are due


@dataclass(frozen=True)
class ArchiveSettings:
    original_retention_days: float = 30.0
    purge_interval_hours: float = 1.0


@dataclass(frozen=True)
class WebSettings:
    """``[web]``: the console, /metrics, /healthz, /readyz and DICOMweb over HTTP(S).

    Absent, no HTTP server runs. A host other than loopback needs ``users`` (every request
    then authenticates) and ``[tls]`` (it serves HTTPS with the node's certificate)."""

    enabled: bool = True  # false: keep the table, run no HTTP server
    host: str = "127.0.0.1"
    port: int = 8080
    users: tuple[Credential, ...] = ()  # NAME:HASH entries (dicomnode web user); none: open

    @property
    def authenticates(self) -> bool:
        return bool(self.users)


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``: harmonisation and training jobs run on Celery workers through a Redis
    broker (``dicomnode.cluster``); without the table the node's embedded worker runs them."""

    broker: str = ""  # redis://host:port/db (rediss:// for TLS); required
    queue: str = "harmonise"  # the harmonisation jobs' queue (dicomnode worker --queue)
    train_queue: str = "train"  # training jobs (dicomnode train site --cluster)
    task_time_limit: float = 1800.0  # seconds a harmonisation job may run on a worker
    train_time_limit: float = 3000.0  # seconds a training job may run
    visibility_timeout: float = 3600.0  # a job a dead worker held is redelivered after this
    poll_interval: float = 0.5  # seconds between the node's passes over its dispatched jobs


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int | None = None
    tls: bool = False  # the node connects to this peer over TLS ([tls])


@dataclass(frozen=True)
class Config:
    path: Path
    node: NodeSettings = field(default_factory=NodeSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    peers: tuple[Peer, ...] = ()
    routes: tuple[Route, ...] = ()
    web: WebSettings | None = None  # no [web] table: no HTTP server
    cluster: ClusterSettings | None = None  # None: the embedded worker

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this AE title (titles compare without padding)."""
        want = ae_title.strip()
        return next((p for p in self.peers if p.ae_title == want), None)

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def archive_dir(self) -> Path:
        return self.node.data_dir / "archive"

    @property
    def incoming_dir(self) -> Path:
        """C-STORE data sets being received (on the spool's file system: renamed into it)."""
        return self.node.data_dir / "incoming"

    @property
    def index_path(self) -> Path:
        return self.node.data_dir / "index.sqlite"


# Smallest allowed value of an integer key (others: >= 0; non-integer numbers: > 0).
_MINIMUM = {
    ("node", "max_associations"): 1,
    ("node", "max_handshakes_per_host"): 1,
    ("node", "max_handshakes"): 1,
    ("node", "max_job_attempts"): 1,
    ("inference", "batch_size"): 1,
}
# Integer keys where 0 means unlimited and anything else must be at least this. A PDU
# must carry a whole command set and useful data: 4096 bytes is the smallest maximum
# length dcmtk accepts (ASC_MINIMUMPDUSIZE), and peers commonly assume it (PS3.8 D.1).
_ZERO_OR_AT_LEAST = {
    ("node", "max_pdu_size"): 4096,
}

_CHOICES = {
    ("node", "duplicate_policy"): {"replace", "keep-first"},
    ("node", "unmatched"): {"archive", "ignore"},
    ("node", "log_level"): {"debug", "info", "warning", "error"},
    ("inference", "device"): {"auto", "cpu", "cuda"},
}


def _coerce(section: str, key: str, value: Any, default: Any, path: Path) -> Any:
    where = f"{path}: [{section}] {key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        low = _MINIMUM.get((section, key), 0)
        if value < low:
            raise ConfigError(f"{where} must be at least {low}, got {value}")
        floor = _ZERO_OR_AT_LEAST.get((section, key))
        if floor and 0 < value < floor:
            raise ConfigError(f"{where} must be 0 (unlimited) or at least {floor}, got {value}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}")
        if value <= 0:
            raise ConfigError(f"{where} must be positive, got {value}")
        return float(value)
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty path string, got {value!r}")
        return _from_config(value, path)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {sorted(choices)}, got {value!r}")
    return value


def _from_config(value: str, path: Path) -> Path:
    """A path from the config file at ``path``: relative ones resolve from its folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (path.parent.parent / p if _is_conf_dir(path) else
                                      path.parent / p)


def _is_conf_dir(path: Path) -> bool:
    """Relative paths in a file under a ``conf/`` folder resolve from the folder above it.

    That keeps the shipped ``conf/node.toml`` meaning ``var`` and ``models`` of the
    checkout, wherever the node is started from.
    """
    return path.parent.name == "conf"


def _section(cls: type, section: str, raw: Any, path: Path) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{key}' in [{section}]"
                              f" (known: {', '.join(sorted(known))})")
        values[key] = _coerce(section, key, value, known[key].default, path)
    defaults = cls()
    for name, f in known.items():
        if name not in values and isinstance(f.default, Path):
            values[name] = _coerce(section, name, str(getattr(defaults, name)), f.default, path)
    return cls(**values)


def _ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string")
    title = value.strip()
    if len(title) > 16 or "\\" in title or not title.isprintable():
        raise ConfigError(f"{where} '{title}' is not a valid AE title (1-16 printable characters,"
                          " no backslash)")
    return title


def _peers(raw: Any, path: Path) -> tuple[Peer, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: [[peers]] must be an array of tables")
    peers = []
    for i, item in enumerate(raw):
        where = f"{path}: [[peers]] #{i + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(item) - {"ae_title", "host", "port", "tls"}
        if unknown:
            raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}'"
                              " (known: ae_title, host, port, tls)")
        title = _ae_title(item.get("ae_title"), f"{where} ae_title")
        host = item.get("host")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{where} host must be a non-empty string")
        port = item.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 0 < port < 65536):
            raise ConfigError(f"{where} port must be an integer 1-65535, got {port!r}")
        tls = item.get("tls", False)
        if not isinstance(tls, bool):
            raise ConfigError(f"{where} tls must be true or false, got {tls!r}")
        peers.append(Peer(title, host, port, tls))
    titles = [p.ae_title for p in peers]
    dupes = {t for t in titles if titles.count(t) > 1}
    if dupes:
        raise ConfigError(f"{path}: [[peers]] ae_title '{sorted(dupes)[0]}' is listed twice")
    return tuple(peers)


def _tls(tls: TlsSettings, peers: tuple[Peer, ...], path: Path) -> TlsSettings:
    """``[tls]`` with its files resolved, checked by building the contexts the node will
    use, so a wrong file or a key that does not match its certificate stops the start."""
    tls = TlsSettings(*(str(_from_config(v, path)) if v else "" for v in
                        (tls.certificate, tls.private_key, tls.ca)))
    try:
        if tls.listening or tls.private_key:
            server_context(tls)
        if tls.ca or any(p.tls for p in peers):
            client_context(tls)
    except TlsError as exc:
        raise ConfigError(f"{path}: [tls] {exc}") from None
    return tls


def loopback_host(host: str) -> bool:
    """Whether a listening address serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def _web(raw: Any, path: Path, node: NodeSettings, tls: TlsSettings) -> WebSettings:
    """``[web]``, with its users parsed; off the loopback only with users and TLS."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [web] must be a table")
    raw = dict(raw)
    entries = raw.pop("users", [])
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{path}: [web] users must be a list of \"NAME:HASH\" strings")
    try:
        users = tuple(parse(e) for e in entries)
    except ValueError as exc:
        raise ConfigError(f"{path}: [web] users: {exc}") from None
    if len({u.name for u in users}) != len(users):
        raise ConfigError(f"{path}: [web] users: a name is listed twice")
    web = replace(_section(WebSettings, "web", raw, path), users=users)
    where = f"{path}: [web]"
    if not 0 < web.port < 65536:
        raise ConfigError(f"{where} port must be 1-65535, got {web.port}")
    if web.port == node.port:
        raise ConfigError(f"{where} port {web.port} is the DICOM port of [node]")
    if not loopback_host(web.host):
        if not users:
            raise ConfigError(f"{where} host {web.host} is not a loopback address: it needs"
                              " users (make one with: dicomnode web user NAME)")
        if not tls.listening:
            raise ConfigError(f"{where} host {web.host} is not a loopback address: it needs"
                              " [tls] certificate and private_key (the console serves HTTPS)")
    return web


def _cluster(raw: Any, path: Path) -> ClusterSettings:
    """``[cluster]``, checked: a Redis broker URL, two distinct queues, and a visibility
    timeout longer than any job may run (else a running job is delivered twice)."""
    cluster: ClusterSettings = _section(ClusterSettings, "cluster", raw, path)
    if not cluster.broker.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{path}: [cluster] broker must be a redis://host:port/db URL,"
                          f" got {cluster.broker!r}")
    for key in ("queue", "train_queue"):
        if not getattr(cluster, key).strip():
            raise ConfigError(f"{path}: [cluster] {key} must be a non-empty queue name")
    if cluster.queue == cluster.train_queue:
        raise ConfigError(f"{path}: [cluster] train_queue must differ from queue")
    longest = max(cluster.task_time_limit, cluster.train_time_limit)
    if cluster.visibility_timeout <= longest:
        raise ConfigError(f"{path}: [cluster] visibility_timeout ({cluster.visibility_timeout:g})"
                          f" must be longer than task_time_limit and train_time_limit"
                          f" ({longest:g})")
    return cluster


def default_config_path() -> Path:
    """``conf/node.toml`` of the working folder, else the checkout's shipped one."""
    if DEFAULT_CONFIG.is_file() or not SHIPPED_CONFIG.is_file():
        return DEFAULT_CONFIG
    return SHIPPED_CONFIG


def _check_target_domain(route: Route, models_dir: Path, path: Path) -> None:
    """A route to a multi-domain model names one of its domains as ``target_domain``, and only
    such a route names one. Checked here where the model folder is readable; otherwise when a
    series is routed (the model may be installed after the config)."""
    try:
        info = read_model_info(models_dir / route.model)
    except ModelError:
        return
    try:
        info.target_style(route.target_domain)
    except ModelError as exc:
        raise ConfigError(f"{path}: route '{route.name}': {exc}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config at ``path``, ``$DICOMNODE_CONFIG`` or ``conf/node.toml``
    (of the working folder, else of the checkout the package runs from)."""
    chosen = Path(path or os.environ.get(ENV_CONFIG) or default_config_path()).expanduser()
    try:
        raw = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{chosen}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
    chosen = chosen.resolve()
    sections = {"node": NodeSettings, "inference": InferenceSettings,
                "outbox": OutboxSettings, "archive": ArchiveSettings, "tls": TlsSettings}
    tables = {"peers", "routes", "web", "cluster"}
    unknown = set(raw) - set(sections) - tables
    if unknown:
        raise ConfigError(f"{chosen}: unknown key '{sorted(unknown)[0]}' at top level"
                          f" (known: {', '.join(sorted([*sections, *tables]))})")
    parsed = {name: _section(cls, name, raw.get(name), chosen) for name, cls in sections.items()}
    node: NodeSettings = parsed["node"]
    _ae_title(node.ae_title, f"{chosen}: [node] ae_title")
    if not 0 < node.port < 65536:
        raise ConfigError(f"{chosen}: [node] port must be 1-65535, got {node.port}")
    peers = _peers(raw.get("peers"), chosen)
    parsed["tls"] = _tls(parsed["tls"], peers, chosen)
    if "web" in raw:
        parsed["web"] = _web(raw["web"], chosen, node, parsed["tls"])
    try:
        routes = parse_routes(raw.get("routes"), source=str(chosen))
    except RoutingError as exc:
        raise ConfigError(str(exc)) from None
    known_peers = {p.ae_title for p in peers}
    for route in routes:
        for dest in route.send_to:
            if dest not in known_peers:
                raise ConfigError(f"{chosen}: route '{route.name}' send_to '{dest}'"
                                  " is not an AE title in [[peers]]")
        _check_target_domain(route, node.models_dir, chosen)
    cluster = _cluster(raw["cluster"], chosen) if "cluster" in raw else None
    return Config(path=chosen, peers=peers, routes=tuple(routes), cluster=cluster, **parsed)
