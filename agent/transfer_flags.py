"""The transfer flags ``modelcache pull`` and ``modelcache agent`` share, declared once.

Names, parsers and defaults are the same for both (the defaults are :class:`TransferSettings`'s);
the help texts differ in words only (pull speaks of one model, the agent of the whole node, in its
shorter style). Every value is judged while parsing, the same way for both: a usage error names
the flag (exit 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.download.transfer import TransferSettings
from localmodel.errors import InvalidInput
from localmodel.quantity import parse_low_speed_limit, parse_rate, parse_size

Command = Literal["pull", "agent"]


def positive(flag: str, kind: type[int] | type[float] = int) -> Callable[[str], float]:
    """A parser for a number greater than zero; InvalidInput naming ``flag`` otherwise."""

    def parse(text: str) -> float:
        try:
            value: float = kind(text)
        except ValueError:
            raise InvalidInput(f"{flag}: {text!r} is not a number") from None
        if not 0 < value < math.inf:  # NaN fails both
            raise InvalidInput(f"{flag}: must be a finite number greater than zero, got {text}")
        return value

    return parse


MAX_CONCURRENCY = 256  # connections at once: past it a host's descriptors and the server's patience go


def parse_concurrency(text: str) -> int:
    """``--concurrency``: a whole number from 1 to :data:`MAX_CONCURRENCY`."""
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"--concurrency: {text!r} is not a whole number (1-{MAX_CONCURRENCY})") from None
    if not 1 <= value <= MAX_CONCURRENCY:
        raise InvalidInput(f"--concurrency: {value} is out of range (1-{MAX_CONCURRENCY})")
    return value


def parse_seconds(text: str) -> float:
    """``--low-speed-time``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"--low-speed-time: {text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise InvalidInput(f"--low-speed-time: {text!r} must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class TransferFlag:
    flag: str
    parse: Mapping[Command, Callable[[str], Any]]
    default: Any
    help: Mapping[Command, str]


_DEFAULTS = TransferSettings()

TRANSFER_FLAGS: tuple[TransferFlag, ...] = (
    TransferFlag(
        "--concurrency",
        {"pull": parse_concurrency, "agent": parse_concurrency},
        _DEFAULTS.concurrency,
        {"pull": "connections at once, 1-256 (default 16)", "agent": "connections, all models, 1-256 (16)"},
    ),
    TransferFlag(
        "--max-bandwidth",
        {"pull": parse_rate, "agent": parse_rate},
        None,
        {
            "pull": "cap in bytes/s over any second, e.g. 200MB/s (decimal) or 200MiB/s (default: none)",
            "agent": "a cap for the node in bytes/s over any second, e.g. 500MB/s (decimal) or 500MiB/s",
        },
    ),
    TransferFlag(
        "--chunk-size",
        {"pull": parse_size, "agent": parse_size},
        _DEFAULTS.chunk_size,
        {
            "pull": "large files are fetched as parallel ranges of this size (default 64Mi)",
            "agent": "range size (64Mi)",
        },
    ),
    TransferFlag(
        "--low-speed-limit",
        {"pull": parse_low_speed_limit, "agent": parse_low_speed_limit},
        _DEFAULTS.low_speed_limit,
        {
            "pull": "a connection slower than this many bytes/s for --low-speed-time is retried on a "
            "new one (default 1Ki; 0: off)",
            "agent": "bytes/s under which a connection is retried on a new one (1Ki; 0: off)",
        },
    ),
    TransferFlag(
        "--low-speed-time",
        {"pull": parse_seconds, "agent": parse_seconds},
        _DEFAULTS.low_speed_time,
        {"pull": "seconds over which --low-speed-limit is measured (default 30)", "agent": "seconds (30)"},
    ),
)


def add_transfer_flags(parser: argparse.ArgumentParser, command: Command) -> None:
    """Declare :data:`TRANSFER_FLAGS` on ``parser`` with ``command``'s parsers and help texts."""
    for f in TRANSFER_FLAGS:
        parser.add_argument(f.flag, type=f.parse[command], default=f.default, help=f.help[command])


def transfer_settings(args: argparse.Namespace, **rest: Any) -> TransferSettings:
    """The :class:`TransferSettings` of parsed transfer flags; ``rest``: its other fields (proxies,
    CA bundle, verify, allow_private), read by the entry point."""
    return TransferSettings(
        concurrency=args.concurrency,
        chunk_size=args.chunk_size,
        max_bandwidth=args.max_bandwidth,
        low_speed_limit=args.low_speed_limit,
        low_speed_time=args.low_speed_time,
        **rest,
    )
