"""Connection failures in words, one line each, for messages that name the endpoint."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

from localmodel.errors import TransientError


def causes(e: BaseException) -> Iterator[BaseException]:
    """``e``, then what is behind it, breadth first, each once: its ``__cause__``, ``__context__`` and
    exceptions among its arguments (httpx, urllib3 and botocore wrap the OS's error, some as one)."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        cause = todo.pop(0)
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        yield cause
        todo += [c for c in (cause.__cause__, cause.__context__) if c is not None]
        todo += [a for a in cause.args if isinstance(a, BaseException)]


def connection_words(e: BaseException, endpoint: str) -> str:
    """Why a connection to ``endpoint`` (a URL or ``host:port``) failed, in words: "connection refused
    by 127.0.0.1:9", "cannot resolve host hub.example", "connection reset by …", "no answer from …".

    The OS's error is looked for along the chain of causes (httpx, urllib3 and botocore wrap it, some
    as an argument); an error without one is named by its text, else its type."""
    parts = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
    host = parts.hostname or endpoint
    try:
        where = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        where = host
    for cause in causes(e):
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve host {host} ({cause.strerror or cause})"
        if isinstance(cause, http.client.IncompleteRead):
            more = f" with {cause.expected} bytes still to come" if cause.expected else ""
            return f"the connection to {where} closed{more}"
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {where}"
        if isinstance(cause, ConnectionResetError):
            return f"connection reset by {where}"
        if isinstance(cause, TimeoutError):
            return f"no answer from {where}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS with {where} failed ({cause.reason or cause})"
        if isinstance(cause, OSError) and cause.strerror:
            return f"{cause.strerror} ({where})"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__} from {where}: {text}" if text else f"{type(e).__name__} from {where}"


def retried(e: TransientError, attempts: int, seconds: float) -> TransientError:
    """``e`` once retrying has given up, saying what was tried: "… (after 4 attempts over 7 s)"."""
    if attempts <= 1:
        return e
    return TransientError(f"{e} (after {attempts} attempts over {seconds:.0f} s)", retry_after=e.retry_after)
