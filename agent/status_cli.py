"""``modelcache status --cache-dir DIR``: what a node's cache holds and is doing, from the state file
the agent keeps under the cache folder (``.modelcache/state.json``), or, without one, from a scan."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from agent.download.peers import blame_words
from localmodel.cliargs import UsageParser, path_arg
from localmodel.errors import InvalidInput, SpecError
from localmodel.folders import unreachable
from localmodel.layout import STATE_FILE_VERSION, STORAGE_KEY_RE, CacheLayout
from localmodel.manifest import Manifest
from localmodel.quantity import Quantity, readable
from localmodel.resources import LocalModelNodeStatus


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="modelcache status", description="What a node's model cache holds and is doing.")
    p.add_argument(
        "--cache-dir",
        type=path_arg("--cache-dir", "/var/lib/modelcache"),
        required=True,
        help="the agent's cache folder (--cache-dir)",
    )
    p.add_argument(
        "--output",
        choices=["table", "json"],
        default="table",
        help="table (default), or the agent's state file as JSON",
    )
    return p


def read_state(cache_dir: Path) -> dict[str, Any]:
    """The agent's last status, or what the folder holds when no agent ever ran on it."""
    layout = CacheLayout(cache_dir)
    try:
        exists, is_dir = cache_dir.exists(), cache_dir.is_dir()
    except OSError as e:  # a folder above it this user may not search
        raise InvalidInput(f"--cache-dir: {unreachable(cache_dir, e)}") from None
    if exists and not is_dir:
        raise InvalidInput(f"--cache-dir: {cache_dir} is not a folder; pass the agent's cache folder")
    if not is_dir:
        raise InvalidInput(f"--cache-dir: {cache_dir} does not exist")
    try:
        data = json.loads(layout.state_file.read_text())
    except FileNotFoundError:
        return _from_disk(layout)
    except ValueError as e:
        # A state file cut short (a full disk, a crash on a filesystem without atomic rename) or
        # overwritten: the published models are still told by their manifests.
        return _from_disk(
            layout, note=f"{layout.state_file} is not valid JSON ({e}); models from the manifests"
        )
    except OSError as e:
        raise SpecError(f"cannot read {layout.state_file}: {e.strerror or e}", field="--cache-dir") from None
    if (problem := state_file_problem(data)) is not None:
        return _from_disk(
            layout,
            note=f"{layout.state_file} is not an agent state file of this version ({problem}); "
            "models from the manifests",
        )
    return cast(dict[str, Any], data)  # an object: state_file_problem found nothing wrong


def state_file_problem(data: Any) -> str | None:
    """What keeps ``data`` (a state file's JSON) from being the agent's state file of
    :data:`STATE_FILE_VERSION` as the table reads it, in words naming the field; None when it is.
    The status block is judged as a LocalModelNode's status is (:class:`LocalModelNodeStatus`)."""
    if not isinstance(data, dict):
        return f"expected an object, got {type(data).__name__}"
    if data.get("version") != STATE_FILE_VERSION:
        return f"version: expected {STATE_FILE_VERSION}, got {data.get('version')!r}"
    for key in ("node", "updated"):
        if not isinstance(data.get(key), str | None):
            return f"{key}: expected a string, got {type(data[key]).__name__}"
    if not isinstance(data.get("status"), dict):
        return "status: expected an object"
    try:
        LocalModelNodeStatus.from_json(data["status"])
    except SpecError as e:
        return str(e)
    return None


def _from_disk(layout: CacheLayout, *, note: str = "no agent state file") -> dict[str, Any]:
    models: dict[str, Any] = {}
    for folder in sorted(layout.models.glob("*")) if layout.models.is_dir() else []:
        if not STORAGE_KEY_RE.match(folder.name):
            continue
        try:
            manifest = Manifest.read(layout.manifest_file(folder.name))
        except (SpecError, OSError):
            continue
        models[folder.name] = {
            "state": "ModelDownloaded",
            "storageKey": folder.name,
            "sourceModelUri": manifest.source_model_uri,
            "bytesDone": manifest.total_bytes,
            "bytesTotal": manifest.total_bytes,
        }
    return {"node": None, "ready": False, "status": {"models": models, "summary": note}}


def render_table(data: dict[str, Any]) -> str:
    status = data.get("status") or {}
    models = status.get("models") or {}
    rows = [("NAME", "STORAGE KEY", "STATE", "DONE/TOTAL", "FROM", "CHECKED", "REASON")]
    for name, m in sorted(models.items()):
        done, total = int(m.get("bytesDone") or 0), int(m.get("bytesTotal") or 0)
        pct = f" {100 * done // total}%" if total else ""
        rows.append(
            (
                name,
                str(m.get("storageKey") or ""),
                str(m.get("state") or ""),
                f"{readable(done)} / {readable(total)}{pct}",
                _sources(m),
                _checked(m),
                _why(m),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    cap = status.get("capacity") or {}
    head = f"node {data.get('node') or '-'}: {status.get('summary') or ''}"
    if cap:
        limit = _size(cap["limit"]) if cap.get("limit") else "no limit"
        head += f"; {_size(cap.get('used'))} used of {limit}"
    if status.get("peerAddress"):
        head += f"; serving peers on {status['peerAddress']}"
    if data.get("updated"):
        head += f" (as of {data['updated']})"
    problems = [
        c.get("message")
        for c in status.get("conditions") or []
        if c.get("status") == "False" and c.get("message")
    ]
    problems += [
        f"{name}: peer {d.get('address')} dropped: {blame_words(str(d.get('reason') or 'no reason given'))}"
        for name, m in sorted(models.items())
        for d in m.get("peersDropped") or []
    ]
    return "\n".join([head, *lines, *(f"warning: {p}" for p in problems)])


def _sources(model: dict[str, Any]) -> str:
    """Where the last download's bytes came from (peer fill): '1.2 GiB peers, 300 MiB origin'; '-'
    when not reported (no download since the agent started, or an agent without peer fill)."""
    peers, origin = model.get("bytesFromPeers"), model.get("bytesFromOrigin")
    if peers is None and origin is None:
        return "-"
    return f"{readable(int(peers or 0))} peers, {readable(int(origin or 0))} origin"


def _checked(model: dict[str, Any]) -> str:
    """How the last download's files were checked: '3 verified, 1 size only'; '-' when the agent has
    not downloaded it since it started (a model found published keeps no record of how)."""
    verified, size_only = model.get("filesVerified"), model.get("filesSizeOnly")
    if verified is None and size_only is None:
        return "-"
    return f"{int(verified or 0)} verified, {int(size_only or 0)} size only"


def _why(model: dict[str, Any]) -> str:
    """The reason, and for a model in error the message too (a refusal's numbers are in it)."""
    reason, message = str(model.get("reason") or ""), str(model.get("message") or "")
    if model.get("state") == "ModelDownloadError" and message:
        return f"{reason}: {message}" if reason else message
    return reason


def _size(quantity: Any) -> str:
    try:
        return readable(Quantity.parse(quantity).bytes)
    except InvalidInput:
        return str(quantity)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    data = read_state(args.cache_dir)
    if args.output == "json":
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
    else:
        sys.stdout.write(render_table(data) + "\n")
    return 0
