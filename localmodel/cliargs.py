"""What every ``modelcache`` subcommand's command line shares: a usage error is InvalidInput (one
line on stderr, exit 2, as the contract fixes), and the ``HOST:PORT`` addresses servers listen on."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from localmodel.errors import InvalidInput


class UsageParser(argparse.ArgumentParser):
    """argparse with usage errors as InvalidInput and no abbreviations: ``--standalon`` is an unknown
    flag, never ``--standalone`` (a typo must not start a daemon with other settings)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise InvalidInput(message)


def parse_addr(text: str, *, flag: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[::1]:PORT``; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(f"{flag}: {text!r} is not HOST:PORT; write e.g. 0.0.0.0:8081 or :8081")
    return (host.strip("[]") or "0.0.0.0", int(port))


def path_arg(flag: str, example: str) -> Callable[[str], Path]:
    """A parser for a path flag that refuses an empty or blank value (an unset variable in a
    manifest): ``Path("")`` is the working folder, which would be read or written in its place.
    InvalidInput names ``flag`` and shows ``example``."""

    def parse(text: str) -> Path:
        if not text.strip():
            raise InvalidInput(f"{flag}: empty; name the path, e.g. {flag} {example}")
        return Path(text)

    return parse
