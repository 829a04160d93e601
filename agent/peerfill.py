"""Peer fill in the agent, receiving side: which peers a model's download asks (the controller's
list in the LocalModelNode's spec, else ``--peers``), and how each peer it drops is shown (the
model's status at once; an Event for bad bytes; a counter)."""

from __future__ import annotations

from collections.abc import Callable

from agent.download.peers import Peer, PeerSettings, PeerSource, blame_words, dropped_for_bad_bytes
from localmodel.resources import DroppedPeer, LocalModelInfo


def peer_source(
    settings: PeerSettings | None,
    static: tuple[Peer, ...],
    info: LocalModelInfo | None,
    on_drop: Callable[[DroppedPeer], None],
) -> PeerSource | None:
    """The peers of one download; None when peer fill is off (no ``--peer-token-file``). The
    controller's list (``spec.localModels[].peers``, nearest first) and manifest digest when the
    spec has them, else ``static`` (``--peers``: state unknown, their holdings tell)."""
    if settings is None:
        return None
    # Their state goes along: a peer fetching the model (ModelDownloading) is waited for.
    listed = tuple(Peer(p.address, p.node, p.state) for p in info.peers) if info is not None else ()
    return PeerSource(
        listed or static,
        settings,
        info.manifest_sha256 if info is not None else None,
        on_drop=on_drop,
    )


def dropped_words(name: str, dropped: DroppedPeer, peers: tuple[Peer, ...]) -> str | None:
    """The PeerDropped Event's message for a peer dropped for bad bytes, naming its node and
    address; None for a drop that is no fault of its bytes (a failure, a stall: the status shows it)."""
    if not dropped_for_bad_bytes(dropped.reason):
        return None
    node = next((p.node for p in peers if p.address == dropped.address and p.node), None)
    who = f"node {node} ({dropped.address})" if node else dropped.address
    return f"{name}: peer {who} dropped: {blame_words(dropped.reason)}"
