"""Connecting to a tiled server and turning its failures into registry errors.

Used by every role of :class:`~chx_masks.MaskRegistry` (through ``_translate``)
and by :mod:`chx_masks.stores` and :mod:`chx_masks._local`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._errors import ChxMasksError, MaskPermissionError, RegistryUnavailableError


def redact(uri: str) -> str:
    """A URI as it may be shown: password replaced by ``***``, api_key dropped.

    Examples
    --------
    >>> redact("postgresql+asyncpg://chx:s3cret@db.nsls2.bnl.gov:5432/masks")
    'postgresql+asyncpg://chx:***@db.nsls2.bnl.gov:5432/masks'
    >>> redact("http://127.0.0.1:8000/api/v1?api_key=abc123&x=1")
    'http://127.0.0.1:8000/api/v1?x=1'
    """
    parts = urlsplit(str(uri))
    if not parts.scheme or not parts.netloc:
        return str(uri)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, address = netloc.rpartition("@")
        user, has_password, _ = credentials.partition(":")
        netloc = f"{user}:***@{address}" if has_password else f"{user}@{address}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "api_key"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_PASSWORD_IN_URI = re.compile(r"(\w[\w+.-]*://[^\s/:@]*:)[^\s/@]+@")
_API_KEY_PARAM = re.compile(r"(api_key=)[^&\s]+", re.IGNORECASE)
_API_KEY_HEADER = re.compile(r"(Apikey\s+)\w+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with URI passwords, ``api_key=`` values and ``Apikey`` headers hidden.

    Examples
    --------
    >>> redact_text("GET /api/v1/metadata/?api_key=abc123 postgresql://u:pw@db/x")
    'GET /api/v1/metadata/?api_key=*** postgresql://u:***@db/x'
    """
    text = _PASSWORD_IN_URI.sub(r"\1***@", text)
    text = _API_KEY_PARAM.sub(r"\1***", text)
    return _API_KEY_HEADER.sub(r"\1***", text)


def _split_api_key(uri: str, api_key: str | None) -> tuple[str, str | None]:
    """Take ``api_key`` out of a URI's query; an explicit ``api_key`` wins.

    Examples
    --------
    >>> _split_api_key("http://127.0.0.1:8000/masks?api_key=s3cret&x=1", None)
    ('http://127.0.0.1:8000/masks?x=1', 's3cret')
    >>> _split_api_key("http://127.0.0.1:8000", "k")
    ('http://127.0.0.1:8000', 'k')
    """
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    keys = [value for name, value in query if name == "api_key"]
    if not keys:
        return uri, api_key
    rest = urlencode([(name, value) for name, value in query if name != "api_key"])
    return urlunsplit(parts._replace(query=rest)), api_key or keys[-1]


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _connect(uri: str, api_key: str | None, timeout: float, location: str) -> Any:
    """A tiled client of ``uri``, or the registry error that says why not, within ``timeout``."""
    from concurrent.futures import Future

    import httpx
    from tiled.client.constructors import from_context
    from tiled.client.context import Context

    outcome: Future = Future()
    handover = threading.Lock()
    abandoned: list[bool] = []

    def connect() -> None:
        context = None
        try:
            with _translate("connecting", location):
                context, path = Context.from_any_uri(
                    uri, api_key=api_key, timeout=httpx.Timeout(timeout)
                )
                if not context.authenticated and context.server_info.authentication.required:
                    raise MaskPermissionError(
                        f"The registry at {location} requires an API key and none was "
                        "given: set CHX_MASKS_API_KEY (or pass api_key=, or "
                        "--api-key on the command line) to a key from the facility."
                    )
                client = from_context(context, node_path_parts=path, remember_me=False)
                _bound_retries(context, timeout)
        except BaseException as err:
            if isinstance(context, Context):
                context.close()
            outcome.set_exception(err)
            return
        with handover:
            if not abandoned:
                outcome.set_result(client)
                return
        context.close()  # the caller gave up waiting: nobody will close it

    # tiled retries a server that does not answer for up to
    # TILED_RETRY_TIMEOUT (45 s), and on the main thread it prints a bare
    # "Retrying..." line while it does. Connecting in a daemon thread bounds
    # the wait at `timeout` and keeps tiled quiet: the error below says it.
    threading.Thread(target=connect, name="chx-masks-connect", daemon=True).start()
    try:
        return outcome.result(timeout=timeout)
    except TimeoutError:
        with handover:
            late = outcome.done()
            if not late:
                abandoned.append(True)
        if not late:
            raise RegistryUnavailableError(
                f"Cannot reach the mask registry at {location} while connecting (no "
                f"answer within {timeout:g} s). Check that the tiled server at "
                f"{location} is running and reachable."
            ) from None
        return outcome.result()  # it finished just now: its client or its error
    except BaseException:
        # The connection's own error, or an interrupt while waiting for it.
        with handover:
            if not outcome.done():
                abandoned.append(True)  # the thread closes what it opens
        if outcome.done() and outcome.exception() is None:
            outcome.result().context.close()
        raise


def _local_user() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name (some containers): still say which machine
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _key_scopes(client: Any) -> frozenset[str]:
    """The scopes the server grants this client's API key (empty if it says none).

    A key made with ``inherit`` holds its principal's roles' scopes. A
    single-user server's key has a fixed set without any admin scope.
    """
    context: Any = getattr(client, "context", None)
    key = str(getattr(context, "api_key", None) or "")
    if not key:
        return frozenset()
    try:
        if not context.server_info.authentication.links:
            return frozenset()
        info = context.whoami()
    except Exception:
        return frozenset()
    info = info if isinstance(info, Mapping) else {}
    for k in info.get("api_keys") or []:
        if (
            isinstance(k, Mapping)
            and k.get("first_eight")
            and key.startswith(str(k["first_eight"]))
        ):
            scopes = set(k.get("scopes") or ())
            if "inherit" in scopes:
                scopes.discard("inherit")
                for role in info.get("roles") or []:
                    if isinstance(role, Mapping):
                        scopes.update(role.get("scopes") or ())
            return frozenset(scopes)
    return frozenset()


def _identity_of(client: Any) -> str:
    """The server's name for the caller's principal, else the local user."""
    local = _local_user()
    context = getattr(client, "context", None)
    if context is None or not getattr(context, "api_key", None):
        return local
    try:
        if not context.server_info.authentication.links:
            # A single-user server: the key has no principal to report.
            return f"{local} (single-user API key)"
        info = context.whoami()
    except Exception:
        return f"{local} (API key; the server did not say whose)"
    info = info if isinstance(info, Mapping) else {}
    identities = [i for i in info.get("identities") or [] if isinstance(i, Mapping)]
    names = [f"{i['id']} ({i.get('provider', '?')})" for i in identities if i.get("id")]
    if names:
        return names[0]
    if not info.get("uuid"):
        return f"{local} (API key; the server did not say whose)"
    # A service principal has no identity; its key's note says what it is for.
    key = str(context.api_key)
    notes = [
        k.get("note")
        for k in info.get("api_keys") or []
        if isinstance(k, Mapping)
        and k.get("first_eight")
        and k.get("note")
        and key.startswith(str(k["first_eight"]))
    ]
    return f"service principal {info['uuid']}" + (f" (key {notes[0]!r})" if notes else "")


def _detail(err: Any) -> str:
    """The server's own reason for a refusal ("Requires scopes [...]"), if any."""
    try:
        detail = err.response.json().get("detail", "")
    except Exception:
        return ""
    return detail.strip().rstrip(".") if isinstance(detail, str) else ""


class _Step:
    """One registry step on this thread: when it began, and whether a request failed."""

    __slots__ = ("began", "failed")

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.failed = False


_steps = threading.local()


class _GaveUp(Exception):
    """A retry refused: the step already failed and ran past the registry's timeout.

    Not an ``httpx.HTTPError``, so tiled does not retry it in turn.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:g} s")
        self.seconds = seconds


class _BoundedTransport:
    """The HTTP transport of a server registry: retries stop at the registry's timeout.

    tiled retries a server that does not answer for up to its own budget
    ($TILED_RETRY_TIMEOUT, 45 s). Once a request of the current step has
    failed (no connection, no answer), each retry waits only for what is
    left of ``timeout`` since the step began, and none is made once it is
    spent, so that a call on a frozen or refusing server gives up within
    about ``timeout``. A server that answers, however slowly, is never cut
    off.
    """

    def __init__(self, inner: Any, timeout: float) -> None:
        self.inner, self.timeout = inner, timeout

    def handle_request(self, request: Any) -> Any:
        import httpx

        step = getattr(_steps, "current", None)
        if step is not None and step.failed:
            left = self.timeout - (time.monotonic() - step.began)
            if left <= 0:
                raise _GaveUp(self.timeout)
            # A retry waits only for what is left of the step's budget.
            request.extensions["timeout"] = httpx.Timeout(max(left, 0.05)).as_dict()
        try:
            return self.inner.handle_request(request)
        except (httpx.TimeoutException, httpx.NetworkError):
            if step is None:
                raise
            step.failed = True
            if time.monotonic() - step.began >= self.timeout:
                # No retry could answer in time: skip tiled's back-off before it.
                raise _GaveUp(self.timeout) from None
            raise

    def close(self) -> None:
        self.inner.close()


def _bound_retries(context: Any, timeout: float) -> None:
    """Put :class:`_BoundedTransport` under tiled's caching transport of ``context``."""
    outer: Any = getattr(context.http_client, "_transport", None)
    inner = getattr(outer, "transport", None)
    if inner is not None and hasattr(inner, "handle_request"):
        outer.transport = _BoundedTransport(inner, timeout)


@contextmanager
def _translate(action: str, location: str) -> Iterator[None]:
    """Turn transport and authorization failures into registry errors."""
    import httpx

    outermost = getattr(_steps, "current", None) is None
    if outermost:
        _steps.current = _Step()
    try:
        yield
    except ChxMasksError:
        raise
    except _GaveUp as err:
        raise RegistryUnavailableError(
            f"Cannot reach the mask registry at {location} while {action} (no answer "
            f"within {err.seconds:g} s). Check that the tiled server at {location} is "
            "running and reachable."
        ) from None
    except httpx.HTTPStatusError as err:
        code = _status(err)
        if code in (401, 403):
            detail = _detail(err)
            raise MaskPermissionError(
                f"The registry at {location} refused {action} (HTTP {code}"
                f"{': ' + detail if detail else ''}): the credentials in use do not "
                "allow it. Use an API key with the needed scopes (read:metadata, "
                "read:data to read; write:metadata, write:data, create:node to "
                "write), e.g. through CHX_MASKS_API_KEY."
            ) from None
        raise
    except (httpx.TransportError, OSError) as err:
        raise RegistryUnavailableError(
            f"Cannot reach the mask registry at {location} while {action} "
            f"({type(err).__name__}). Check that the tiled server at {location} is "
            "running and reachable."
        ) from err
    finally:
        if outermost:
            _steps.current = None
