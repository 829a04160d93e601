"""``modelcache pull URI DEST``: one model, downloaded whole, verified, resumable."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from agent.download.client import proxies_from_env
from agent.download.engine import TransferSettings
from agent.download.pull import pull
from agent.download.sources import SourceSettings
from agent.download.staging import Destination
from localmodel.cliargs import UsageParser
from localmodel.errors import InvalidInput, QuantityError
from localmodel.quantity import Quantity
from localmodel.uri import parse_uri


def parse_rate(text: str) -> float:
    """'100M', '1.5Gi', '200MB/s', '50MiB/s' -> bytes per second."""
    cleaned = text.strip().removesuffix("/s").removesuffix("B")
    try:
        value = Quantity.parse(cleaned, field="--max-bandwidth")
    except QuantityError:
        raise InvalidInput(
            f"--max-bandwidth: {text!r} is not a rate; use bytes per second like 100M, 1Gi or 200MB/s"
        ) from None
    if value.value <= 0:
        raise InvalidInput(f"--max-bandwidth: {text!r} must be greater than zero")
    return float(value.value)


def parse_size(text: str) -> int:
    try:
        value = Quantity.parse(text, field="--chunk-size").bytes
    except QuantityError as e:
        raise InvalidInput(str(e)) from None
    if value < 64 << 10:
        raise InvalidInput(f"--chunk-size: {text!r} is too small (at least 64Ki)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="modelcache pull", description="Download a whole model into DEST, verified.")
    p.add_argument(
        "uri", metavar="URI", help="hf://OWNER/REPO[:REV], s3://BUCKET/PREFIX, http(s)://..., file:///PATH"
    )
    p.add_argument("dest", metavar="DEST", type=Path, help="the folder to create (published atomically)")
    p.add_argument("--revision", help="hf:// only: branch, tag or commit (overrides :REV in the URI)")
    p.add_argument("--concurrency", type=int, default=16, help="connections at once (default 16)")
    p.add_argument("--max-bandwidth", type=parse_rate, default=None, help="cap, e.g. 200MB/s (default: none)")
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=64 << 20,
        help="large files are fetched as parallel ranges of this size (default 64Mi)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip checksums (sizes are still checked)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; only the summary line")
    return p


class _Bar:
    """A tqdm bar on a terminal; nothing otherwise (logs get the summary line only)."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled
        self.bar: Any = None

    def start(self, *, total_bytes: int, done_bytes: int, files: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"{files} files",
                file=self.stream,
                dynamic_ncols=True,
            )

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.concurrency < 1 or args.concurrency > 256:
        raise InvalidInput(f"--concurrency: {args.concurrency} is out of range (1-256)")
    uri = parse_uri(args.uri, field="URI").with_revision(args.revision)
    settings = TransferSettings(
        concurrency=args.concurrency,
        chunk_size=args.chunk_size,
        max_bandwidth=args.max_bandwidth,
        verify=not args.no_verify,
        proxies=proxies_from_env(),
    )
    bar = _Bar(sys.stderr, enabled=not args.quiet and sys.stderr.isatty())
    try:
        result = asyncio.run(
            pull(
                uri,
                Destination.for_folder(args.dest),
                sources=SourceSettings.from_env(),
                transfer=settings,
                progress=bar,
            )
        )
    finally:
        bar.close()
    rate = result.bytes_transferred / result.seconds / 1e6 if result.seconds > 0 else 0.0
    state = "up to date" if result.up_to_date else ("verified" if settings.verify else "sizes checked")
    print(
        f"{uri.redacted()} -> {args.dest}: {result.files} files, {result.bytes_total} bytes "
        f"({result.bytes_transferred} transferred) in {result.seconds:.2f} s, {rate:.1f} MB/s, {state}"
        + (f", revision {result.revision}" if result.revision else "")
    )
    return 0
