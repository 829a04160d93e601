"""The LocalModelNode status the agent writes, decided from what the loop knows. Pure: no I/O.

Rules:
- Every desired model appears under each of its names (aliases of one storage key share one
  progress); a key without a record is ``Pending``. A cache the placement refused this node appears
  as ``Error`` with the refusal's reason, unless a model of that name is desired anyway.
- The summary counts names: "D/N downloaded", then ", N downloading" and ", N failed or refused"
  when there are any.
- Capacity: the node's limit is the sum of its groups' limits, the groups of refused caches included
  (a node whose every cache was refused still has the limit that refused them); used is the last
  plan's (published plus reserved), or the published bytes before any plan.
- Conditions: ``CacheFolderClean`` lists what the agent left alone in its folder (links, folders
  without our manifest, deletes refused, a state file not written); ``ConfigurationValid`` the
  configuration problem, if any; with ``--peer-addr``, ``PeerServing`` whether peers are served and,
  when not (or when the token file stopped being readable), why.
- ``peerAddress``: where peers reach this agent, only while it serves them (the controller lists
  a node to others only when it reports one).
- The patch keeps conditions of types the agent does not write (the controller's
  ``SpecContested``): a merge patch replaces a list whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.desired import Desired
from localmodel.errors import ModelcacheError
from localmodel.kinds import JSON
from localmodel.layout import storage_key
from localmodel.mergepatch import merge_patch_to
from localmodel.placement import Refusal
from localmodel.quantity import Quantity
from localmodel.resources import (
    Capacity,
    Condition,
    LocalModelNodeGroup,
    LocalModelNodeStatus,
    ModelProgress,
    ModelState,
)
from localmodel.uri import parse_uri


@dataclass(frozen=True)
class CacheFindings:
    """What the agent found in its cache folder and left alone."""

    links: frozenset[str] = frozenset()  # paths below the cache folder
    foreign: frozenset[str] = frozenset()  # storage keys of folders without our manifest
    kept: Mapping[str, str] = field(default_factory=dict)  # storage key -> why its delete was refused
    state_file_error: str | None = None


def cache_condition(found: CacheFindings) -> Condition:
    """``CacheFolderClean``: True when there is nothing to say."""
    parts = []
    if found.links:
        parts.append("symbolic links not followed: " + ", ".join(sorted(found.links)))
    if found.foreign:
        parts.append(
            "folders without a manifest of modelcache, never deleted: "
            + ", ".join(f"models/{k}" for k in sorted(found.foreign))
        )
    parts += [found.kept[k] for k in sorted(found.kept)]
    if found.state_file_error:
        parts.append(found.state_file_error)
    return Condition(
        type="CacheFolderClean",
        status="False" if parts else "True",
        reason="UnmanagedContent" if parts else "Clean",
        message="; ".join(parts),
    )


def config_condition(problem: str | None) -> Condition:
    """``ConfigurationValid``: False with ``problem`` when there is one."""
    return Condition(
        type="ConfigurationValid",
        status="False" if problem else "True",
        reason="InvalidConfiguration" if problem else "Valid",
        message=problem or "",
    )


@dataclass(frozen=True)
class PeerState:
    """The peer server as the status shows it: ``address`` (host:port) while it serves, and the
    problem in words (a token file that cannot be read), if any."""

    address: str | None
    problem: str | None = None


def peer_condition(peer: PeerState) -> Condition:
    """``PeerServing``: True while serving with a readable token file; False with why."""
    if peer.address is None:
        return Condition("PeerServing", "False", "NotServing", peer.problem or "the peer server is starting")
    if peer.problem:
        return Condition(
            "PeerServing", "False", "TokenUnreadable", f"{peer.problem}; the last token read stays in force"
        )
    return Condition("PeerServing", "True", "Serving", f"peers are served on {peer.address}")


def summary(model_status: Mapping[str, ModelState]) -> str:
    """'2/3 downloaded, 1 downloading', counting names."""
    counts: dict[str, int] = {}
    for state in model_status.values():
        counts[state.value] = counts.get(state.value, 0) + 1
    text = f"{counts.get(ModelState.DOWNLOADED.value, 0)}/{len(model_status)} downloaded"
    if n := counts.get(ModelState.DOWNLOADING.value):
        text += f", {n} downloading"
    if n := counts.get(ModelState.ERROR.value):
        text += f", {n} failed or refused"
    return text


def capacity(limit: int | None, used: int) -> Capacity:
    """Bytes -> the status's capacity; no limit, no ``available``."""
    return Capacity(
        limit=Quantity.from_bytes(limit) if limit is not None else None,
        used=Quantity.from_bytes(used),
        available=Quantity.from_bytes(max(0, limit - used)) if limit is not None else None,
    )


def group_limit(groups: Mapping[str, LocalModelNodeGroup], names: set[str]) -> int | None:
    """The sum of the named groups' storage limits in bytes; None when none of them is known."""
    limits = [groups[g].spec.storage_limit.bytes for g in sorted(names) if g in groups]
    return sum(limits) if limits else None


def node_limit(
    desired: Desired, groups: Mapping[str, LocalModelNodeGroup], refused: Sequence[Refusal]
) -> int | None:
    """The node's storage limit in bytes: its groups' limits, the groups of refused caches included."""
    names = {r.group for r in refused}
    if not names:
        return desired.limit
    wanted = {m.node_group for m in desired.models if m.node_group}
    return group_limit(groups, wanted | names)


def refused_progress(r: Refusal) -> ModelProgress:
    """A cache the placement refused this node: ``Error`` with its reason; the key and the redacted
    URI when the URI parses."""
    key: str | None = None
    uri: str | None = None
    with contextlib.suppress(ModelcacheError, ValueError):
        key = storage_key(r.source_model_uri)
        uri = parse_uri(r.source_model_uri).redacted()
    return ModelProgress(
        ModelState.ERROR, storage_key=key, source_model_uri=uri, reason=r.reason, message=r.message
    )


def node_status(
    *,
    desired: Desired,
    progress: Mapping[str, ModelProgress],
    refused: Sequence[Refusal],
    limit: int | None,
    used: int,
    found: CacheFindings,
    config_problem: str | None,
    generation: int | None,
    peer: PeerState | None = None,
) -> LocalModelNodeStatus:
    """The status body: ``progress`` by storage key, ``limit`` and ``used`` in bytes, ``generation``
    the LocalModelNode's observed generation (None before it was seen), ``peer`` the peer server's
    state (None: ``--peer-addr`` is off)."""
    model_status: dict[str, ModelState] = {}
    models: dict[str, ModelProgress] = {}
    for m in desired.models:
        shown = progress.get(m.storage_key) or ModelProgress(ModelState.PENDING, m.storage_key)
        for alias in desired.aliases.get(m.storage_key, (m.status_key,)):
            model_status[alias] = shown.state
            models[alias] = shown
    for r in refused:
        if r.cache not in model_status:
            model_status[r.cache] = ModelState.ERROR
            models[r.cache] = refused_progress(r)
    return LocalModelNodeStatus(
        model_status=model_status,
        models=models,
        capacity=capacity(limit, used),
        summary=summary(model_status),
        observed_generation=generation,
        conditions=(
            cache_condition(found),
            config_condition(config_problem),
            *((peer_condition(peer),) if peer is not None else ()),
        ),
        peer_address=peer.address if peer is not None else None,
    )


def status_patch(current: JSON, status: JSON) -> JSON | None:
    """The merge patch that makes the stored status equal ``status``, or None when it already is."""
    old = current.get("status") or {}
    ours = {c.get("type") for c in status.get("conditions") or ()}
    theirs = [c for c in old.get("conditions") or () if isinstance(c, dict) and c.get("type") not in ours]
    if theirs:
        status = {**status, "conditions": [*(status.get("conditions") or ()), *theirs]}
    return None if old == status else merge_patch_to(old, status)
