"""The peer-fill cluster token (issue 18): the Secret the agents mount and check every peer request
against (``Authorization: Bearer <token>``, :mod:`localmodel.peering`).

The controller creates it when it does not exist: 32 random bytes from :mod:`secrets`, hex, under
the key ``token``. It never reads the token back, never overwrites a Secret of that name (someone's
own token, or a rotated one: rotation is replacing the Secret, which the agents' mounts follow), and
never logs it. A Secret deleted is created again, with a new token, at the next check.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time

from controller.serving import MANAGED_BY, MANAGED_BY_LABEL
from localmodel.errors import AlreadyExists, ClusterStateError, NotFound
from localmodel.kinds import JSON, SECRET
from localmodel.state.base import ClusterState

log = logging.getLogger("modelcache.controller")

# Names, not secrets: the Secret's, its namespace (the agents', manifests/agent/namespace.yaml) and
# its key (the agent mounts it at /var/run/modelcache/peer/token).
PEER_TOKEN_SECRET = "modelcache-peer-token"  # noqa: S105
PEER_TOKEN_NAMESPACE = "modelcache-agent"  # noqa: S105
TOKEN_KEY = "token"  # noqa: S105
TOKEN_BYTES = 32


def token_secret(name: str, namespace: str, token: str) -> JSON:
    """The Secret holding ``token`` under :data:`TOKEN_KEY`, labelled as the controller's."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


async def ensure_token_secret(state: ClusterState, name: str, namespace: str) -> bool:
    """Create the Secret ``namespace/name`` with a new token unless it exists (the module's rule);
    True when this call created it. Raises ClusterStateError (e.g. Forbidden without the RBAC of
    manifests/controller/rbac.yaml)."""
    try:
        await state.get(SECRET, name, namespace=namespace)
        return False
    except NotFound:
        pass
    body = token_secret(name, namespace, secrets.token_hex(TOKEN_BYTES))
    try:
        await state.create(SECRET, body)
    except AlreadyExists:
        return False  # made meanwhile by someone else: theirs stays
    log.info("created Secret %s/%s: the peer-fill token the agents check", namespace, name)
    return True


class PeerToken:
    """:func:`ensure_token_secret` for one controller: at most every ``recheck`` seconds once the
    Secret was seen (or made), at full reconciles; ``where`` is (namespace, name), None: not
    managed. Best effort: a failure is logged (without the token, which it never holds) and tried
    again at the next full reconcile, never a failed reconcile, and the agents say they cannot
    serve peers."""

    def __init__(self, where: tuple[str, str] | None, recheck: float) -> None:
        self.where = where
        self.recheck = recheck
        self._seen: float | None = None  # monotonic

    async def check(self, state: ClusterState) -> None:
        now = time.monotonic()
        if self.where is None or (self._seen is not None and now - self._seen < self.recheck):
            return
        namespace, name = self.where
        try:
            await ensure_token_secret(state, name, namespace)
        except ClusterStateError as e:
            log.warning("cannot make the peer token Secret %s/%s (tried again later): %s", namespace, name, e)
            return
        self._seen = now
