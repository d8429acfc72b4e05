"""The registry as a tiled server on the network: what ``chx-masks serve`` runs.

Used on the machine that keeps the registry (a beamline server, or a laptop
sharing its embedded registry with other processes); clients reach it with
``CHX_MASKS_URI`` (+ ``CHX_MASKS_API_KEY``). Secrets (API keys, database
passwords) are never logged and never shown, except a generated key, once, to
the person who started the server.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# One redactor for the registry and the server (shown URIs, log lines).
from ._connection import redact, redact_text
from ._errors import ChxMasksError, MaskValidationError

__all__ = ["Plan", "ServerInfo", "announcement", "plan_config", "plan_directory", "run"]

API_KEY_ENV = "TILED_SINGLE_USER_API_KEY"
_SQL_SCHEMES = ("sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg")
_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")

KeySource = Literal["generated", "given", "config", "accounts"]


@dataclass(frozen=True)
class ServerInfo:
    """What clients need to know about a running server; holds no secret.

    ``uri`` is what ``CHX_MASKS_URI`` should be; ``catalogs`` and ``storage``
    are shown with passwords replaced by ``***``.
    """

    uri: str
    catalogs: tuple[str, ...]
    storage: tuple[str, ...]
    key_source: KeySource
    public: bool


@dataclass
class Plan:
    """A tiled app ready to serve, where to listen, and what to tell people."""

    app: Any
    host: str
    port: int
    catalogs: tuple[str, ...]
    storage: tuple[str, ...]
    key_source: KeySource
    public: bool
    root_path: str = ""
    # The generated key, shown once in the announcement; None when the key
    # was given (its owner has it) or keys are issued per account.
    generated_key: str | None = field(default=None, repr=False)

    def info(self, port: int) -> ServerInfo:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        uri = f"http://{host}:{port}{self.root_path}/api/v1"
        return ServerInfo(uri, self.catalogs, self.storage, self.key_source, self.public)


# ------------------------------------------------------------------ secrets


def check_api_key(key: str) -> str:
    """Refuse keys tiled would refuse at start-up, before anything is started."""
    if not key or not key.isalnum() or not key.isascii():
        raise MaskValidationError(
            "An API key must be letters and digits only (tiled puts it in URLs), "
            'and not empty. Make one with: python -c "import secrets; '
            'print(secrets.token_hex(32))".'
        )
    return key


def _choose_key(api_key: str | None) -> tuple[str, KeySource]:
    if api_key:
        return check_api_key(api_key), "given"
    return secrets.token_hex(32), "generated"


# ------------------------------------------------------------------- plans


def catalog_uri(directory: Path, catalog: str | None) -> str:
    """The catalog database: ``catalog.db`` in ``directory``, a path or a URI.

    Examples
    --------
    >>> catalog_uri(Path("/data/reg"), None)
    'sqlite:////data/reg/catalog.db'
    >>> catalog_uri(Path("/data/reg"), "postgresql+asyncpg://chx@db/masks")
    'postgresql+asyncpg://chx@db/masks'
    """
    if catalog is None:
        return f"sqlite:///{directory / 'catalog.db'}"
    if "://" not in catalog:
        return f"sqlite:///{Path(catalog).expanduser().resolve()}"
    scheme = catalog.split("://", 1)[0].lower()
    if scheme not in _SQL_SCHEMES:
        raise MaskValidationError(
            f"--catalog {redact(catalog)!r} is not a catalog database tiled can use; "
            "give postgresql+asyncpg://USER@HOST:PORT/DATABASE, sqlite:///PATH or "
            "a file path."
        )
    return catalog


def plan_directory(
    directory: Path,
    *,
    catalog: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    public: bool = False,
) -> Plan:
    """Serve the registry whose arrays live in ``directory/data``.

    With no ``catalog`` the directory is exactly an embedded registry's
    (``catalog.db`` + ``data/``), so ``chx-masks serve`` shares a registry
    that processes on this machine also open directly.

    Parameters
    ----------
    directory : Path
        Writable storage: arrays go to ``directory/data``.
    catalog : str, optional
        Catalog database: ``postgresql+asyncpg://...`` for a shared server
        (created if empty), a SQLite path or URI; default
        ``directory/catalog.db``.
    api_key : str, optional
        The single key clients use; generated (and shown once) if not given.
    public : bool
        Anyone who can connect may read (never write) without a key.
    """
    from tiled.catalog import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    from ._embedded import _locked, _new_catalog, sqlite_waiting

    key, source = _choose_key(api_key)
    data = directory / "data"
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MaskValidationError(
            f"Cannot create the storage directory {data}: {err.strerror}. Give a writable --dir."
        ) from err
    uri = catalog_uri(directory, catalog)
    is_sqlite = uri.split("://", 1)[0].startswith("sqlite")
    with _locked(directory / ".init.lock"):
        database = Path(uri.split("///", 1)[1]) if is_sqlite else None
        if database is not None and not database.exists():
            database.parent.mkdir(parents=True, exist_ok=True)
            _new_catalog(database)
        try:
            tree = from_uri(
                sqlite_waiting(uri), writable_storage=[str(data)], init_if_not_exists=not is_sqlite
            )
        except Exception as err:
            # tiled's message may quote the URI; show ours, redacted.
            raise ChxMasksError(
                f"Cannot open the catalog {redact(uri)} ({type(err).__name__}): check "
                "that the database server is running and the database exists."
            ) from None
    from .policy import AppendOnlyPolicy, validation_registry

    app = build_app(
        tree,
        authentication=Authentication(single_user_api_key=key, allow_anonymous_access=public),
        access_policy=AppendOnlyPolicy(),
        validation_registry=validation_registry(),
    )
    return Plan(
        app=app,
        host=host,
        port=port,
        catalogs=(redact(uri),),
        storage=(str(data),),
        key_source=source,
        public=public,
        generated_key=key if source == "generated" else None,
    )


def unset_references(config_path: Path, environ: Mapping[str, str] | None = None) -> list[str]:
    """Environment variables a tiled config file uses but that are not set.

    tiled leaves an unset ``${NAME}`` in place, which fails later and far from
    the cause (or, for a password, silently becomes the literal text).
    """
    import yaml

    environ = os.environ if environ is None else environ
    files = sorted(config_path.glob("*.y*ml")) if config_path.is_dir() else [config_path]
    missing: list[str] = []

    def walk(value: Any) -> Iterable[str]:
        if isinstance(value, str):
            for braced, bare in _ENV_REFERENCE.findall(value):
                yield braced or bare
        elif isinstance(value, Mapping):
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    for path in files:
        with open(path) as f:
            content = yaml.safe_load(f)
        for name in walk(content):
            if name not in environ and name not in missing:
                missing.append(name)
    return missing


def plan_config(
    config_path: Path,
    *,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    public: bool = False,
) -> Plan:
    """Serve what a tiled configuration file (or directory of them) describes.

    ``host``/``port`` override the file's ``uvicorn`` section. With
    authentication providers in the file, keys belong to accounts (created
    by an admin, with scopes); otherwise one key is used, as for
    :func:`plan_directory`.
    """
    from tiled.config import parse_configs
    from tiled.server.app import build_app_from_config

    missing = unset_references(config_path)
    if missing:
        raise MaskValidationError(
            f"{config_path} uses environment variables that are not set: "
            f"{', '.join('$' + m for m in missing)}. Set them (see deploy/README.md)."
        )
    try:
        config = parse_configs(config_path)
    except Exception as err:
        # Pydantic's message quotes the offending values, which may be secrets.
        raise MaskValidationError(
            f"{config_path} is not a valid tiled configuration ({type(err).__name__}"
            f"{_config_error_fields(err)}). `tiled admin check-config {config_path}` "
            "explains."
        ) from None
    authentication = config.authentication
    if authentication.providers:
        source: KeySource = "accounts"
        generated = None
        if api_key:
            raise MaskValidationError(
                f"{config_path} configures authentication providers, so API keys belong "
                "to accounts (see deploy/README.md); --api-key applies only to servers "
                "without providers."
            )
    elif api_key or authentication.single_user_api_key:
        source = "given" if api_key else "config"
        authentication.single_user_api_key = check_api_key(
            api_key or authentication.single_user_api_key
        )
        generated = None
    else:
        key, source = _choose_key(None)
        authentication.single_user_api_key = generated = key
    if public:
        authentication.allow_anonymous_access = True
    uvicorn_options = config.uvicorn
    from ._embedded import sqlite_waiting

    catalogs, storage = [], []
    for tree in config.trees or []:
        args = tree.args or {}
        if "uri" in args:
            catalogs.append(redact(str(args["uri"])))
            args["uri"] = sqlite_waiting(str(args["uri"]))
        for location in args.get("writable_storage") or []:
            storage.append(redact(str(location)))
    _enforce_append_only(config)
    app = build_app_from_config(config)
    return Plan(
        app=app,
        host=host or uvicorn_options.get("host", "127.0.0.1"),
        port=port if port is not None else int(uvicorn_options.get("port", 8000)),
        catalogs=tuple(catalogs),
        storage=tuple(storage),
        key_source=source,
        public=bool(authentication.allow_anonymous_access),
        root_path=config.root_path,
        generated_key=generated,
    )


def _enforce_append_only(config: Any) -> None:
    """The registry's access policy and validators, unless the file names its own."""
    from tiled.config import ValidationSpec

    from .policy import VALIDATORS, AppendOnlyPolicy

    if config.access_policy is None:
        config.access_policy = AppendOnlyPolicy()
    declared = {spec.spec for spec in config.specs}
    for spec, validator in VALIDATORS.items():
        if spec not in declared:
            config.specs.append(ValidationSpec(spec=spec, validator=validator))


def _config_error_fields(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return ""
    try:
        where = sorted({".".join(str(p) for p in e.get("loc", ())) for e in errors()})
    except Exception:
        return ""
    return f" at {', '.join(w for w in where if w)}" if where else ""


# ------------------------------------------------------------ announcement


def announcement(info: ServerInfo, generated_key: str | None = None) -> str:
    """What ``chx-masks serve`` prints once the server answers.

    Examples
    --------
    >>> info = ServerInfo("http://127.0.0.1:8000/api/v1", ("sqlite:////d/catalog.db",),
    ...                   ("/d/data",), "given", False)
    >>> print(announcement(info))  # doctest: +NORMALIZE_WHITESPACE
    chx-masks registry served by tiled at http://127.0.0.1:8000/api/v1
      catalog  sqlite:////d/catalog.db
      storage  /d/data
    Point clients at it:
      export CHX_MASKS_URI=http://127.0.0.1:8000/api/v1
      export CHX_MASKS_API_KEY=...   (the key this server was given)
    Stop with Ctrl-C.
    """
    lines = [f"chx-masks registry served by tiled at {info.uri}"]
    lines += [f"  catalog  {c}" for c in info.catalogs]
    lines += [f"  storage  {s}" for s in info.storage]
    if info.public:
        lines.append("  public   anyone who can connect may read without a key")
    lines += ["Point clients at it:", f"  export CHX_MASKS_URI={info.uri}"]
    if info.key_source == "generated":
        lines.append(f"  export CHX_MASKS_API_KEY={generated_key}")
        lines.append(
            "  (a key generated for this run, shown only here; give --api-key or "
            f"${API_KEY_ENV} to keep one)"
        )
    elif info.key_source == "given":
        lines.append("  export CHX_MASKS_API_KEY=...   (the key this server was given)")
    elif info.key_source == "config":
        lines.append("  export CHX_MASKS_API_KEY=...   (single_user_api_key of the config)")
    else:
        lines.append(
            "  export CHX_MASKS_API_KEY=...   (a key an admin created for you, "
            "with the scopes you need; see deploy/README.md)"
        )
    lines.append("Stop with Ctrl-C.")
    return "\n".join(lines)


# --------------------------------------------------------------------- run


def log_config() -> dict[str, Any]:
    """tiled's logging, on stderr, with secrets taken out of every line.

    A browser or script may pass ``?api_key=...`` (the access log would keep
    it), and tiled logs catalog URIs as given, password included. stdout is
    left to the announcement.
    """
    from tiled.server.logging_config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"]["secrets"] = {"()": "chx_masks._serve.RedactSecrets"}
    for handler in config["handlers"].values():
        handler["filters"] = ["secrets", *handler.get("filters", [])]
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    for formatter in config["formatters"].values():
        formatter["use_colors"] = None  # colour only on a terminal
    return config


class RedactSecrets(logging.Filter):
    """A logging filter that hides secrets in a record before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            # The access formatter reads these five fields; redact the path only.
            client, method, path, version, status = args
            record.args = (client, method, redact_text(str(path)), version, status)
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


class _Stopped(Exception):
    pass


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ChxMasksError(
            f"Cannot listen on {host}:{port}: {err.strerror}. Choose another --port "
            "(0 picks a free one) or stop what uses it."
        ) from None
    sock.set_inheritable(True)
    return sock


def run(plan: Plan, *, on_ready: Callable[[ServerInfo], None]) -> None:
    """Serve ``plan`` until SIGINT/SIGTERM; call ``on_ready`` once it answers."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                port = self.servers[0].sockets[0].getsockname()[1]
                on_ready(plan.info(port))

    sock = _listen(plan.host, plan.port)
    config = uvicorn.Config(plan.app, log_config=log_config(), loop="asyncio")
    server = _Server(config)

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signum)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the
    # signal; these handlers turn that into a normal return.
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    except SystemExit:
        # uvicorn exits this way when the app's start-up fails.
        if server.started:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if not server.started:
        raise ChxMasksError(
            "The tiled server did not start; its log above says why (a catalog "
            "database that cannot be reached or initialized is the usual cause)."
        )
    sys.stdout.flush()
