"""``modelcache pull URI DEST``: one model, downloaded whole, verified, resumable."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from agent.download.client import aws_ca_bundle, proxies_from_env
from agent.download.engine import PullResult, TransferSettings
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


def parse_low_speed_limit(text: str) -> int:
    """'1024', '1Ki', '10K' -> bytes per second; 0 turns the check off."""
    try:
        value = Quantity.parse(text.strip().removesuffix("/s").removesuffix("B"), field="--low-speed-limit")
    except QuantityError:
        raise InvalidInput(
            f"--low-speed-limit: {text!r} is not a rate; use bytes per second like 1Ki or 10K (0: off)"
        ) from None
    if value.value < 0:
        raise InvalidInput(f"--low-speed-limit: {text!r} must not be negative")
    return int(value.value)


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"--low-speed-time: {text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise InvalidInput(f"--low-speed-time: {text!r} must be a positive number of seconds")
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
    p.add_argument(
        "--low-speed-limit",
        type=parse_low_speed_limit,
        default=TransferSettings.low_speed_limit,
        help="a connection slower than this many bytes/s for --low-speed-time is retried on a new "
        "one (default 1Ki; 0: off)",
    )
    p.add_argument(
        "--low-speed-time",
        type=parse_seconds,
        default=TransferSettings.low_speed_time,
        help="seconds over which --low-speed-limit is measured (default 30)",
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


def checked(result: PullResult, *, verify: bool) -> str:
    """How the files were checked, for the summary: "verified" only when every file's content
    matched a hash the source gave; otherwise the size-only files are counted and named."""
    if not verify:
        return "sizes checked"
    by = "/".join(sorted(result.hash_checked, key=["sha256", "sha1", "md5"].index))
    if result.verified:
        return f"verified by {by}"
    more = "…" if result.size_only > len(result.size_only_names) else ""
    size_only = f"{result.size_only} checked by size only ({', '.join(result.size_only_names)}{more})"
    hashed = sum(result.hash_checked.values())
    if not hashed:
        return f"{size_only}: the source gives no hash for them"
    return f"{hashed} files verified by {by}, {size_only}"


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
        low_speed_limit=args.low_speed_limit,
        low_speed_time=args.low_speed_time,
        proxies=proxies_from_env(),
        # Only S3 sources need boto3's CA bundle; resolving it imports botocore (~0.1 s).
        ca_bundle=aws_ca_bundle() if uri.scheme == "s3" else None,
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
    state = "up to date" if result.up_to_date else checked(result, verify=settings.verify)
    print(
        f"{uri.redacted()} -> {args.dest}: {result.files} files, {result.bytes_total} bytes "
        f"({result.bytes_transferred} transferred) in {result.seconds:.2f} s, {rate:.1f} MB/s, {state}"
        + (f", revision {result.revision}" if result.revision else "")
    )
    return 0
