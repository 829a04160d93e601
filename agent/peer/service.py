"""The peer server's life inside the agent: the token read, the server started, the address other
nodes reach it at, and what the status says of it.

``modelcache agent --peer-addr`` builds a :class:`PeerService` at its entry point and runs
:meth:`PeerService.run` beside the reconcile loop; the loop's status shows :meth:`PeerService.state`
(``status.peerAddress`` and the ``PeerServing`` condition, :func:`agent.status.peer_condition`).

A token file that cannot be read at start is a usage error in standalone mode (the user's own path:
exit 2, one line, :meth:`PeerService.check_token`). In a cluster the Secret may not exist yet (the
controller creates it, and the DaemonSet mounts it ``optional``): the agent runs and downloads from
the origin, says why it serves nothing (one log line, ``PeerServing`` False, no ``peerAddress``, so the
controller lists it to no one), and starts serving once the file holds a token, read again every
``retry`` seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from agent.metrics import AgentMetrics
from agent.peer.server import PeerServer, ServeSettings
from agent.peer.token import TokenFile
from agent.status import PeerState
from localmodel.errors import InvalidInput
from localmodel.hosts import host_error, is_wildcard, port_number

log = logging.getLogger("modelcache.agent")


@dataclass(frozen=True)
class PeerConfig:
    """``--peer-*`` as parsed: the server's settings, the token file, and ``--peer-advertise``
    (None: :func:`advertise_address`'s default)."""

    serve: ServeSettings
    token_file: Path
    advertise: str | None = None


def parse_advertise(text: str) -> str:
    """``--peer-advertise HOST:PORT`` as given (``[v6]:PORT`` for IPv6); InvalidInput naming the flag
    for a missing host, one that is not an IP address or RFC 1123 name (a URL, a blank), a
    wildcard host or a port outside 1-65535."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host.strip("[]") or port_number(port) is None:
        raise InvalidInput(
            f"--peer-advertise: {text!r} is not HOST:PORT; write the address other nodes reach this "
            "agent at, e.g. 10.0.3.7:7071"
        )
    if is_wildcard(host):
        raise InvalidInput(f"--peer-advertise: {text!r} is a wildcard; name an address other nodes can reach")
    if (problem := host_error(host)) is not None:
        raise InvalidInput(
            f"--peer-advertise: {problem}; write the address other nodes reach this agent at, "
            "e.g. 10.0.3.7:7071"
        )
    return f"{host}:{int(port)}"


def check_pod_ip(value: str | None) -> None:
    """``$POD_IP`` (the downward API's ``status.podIP``), advertised when ``--peer-advertise`` is
    not given: InvalidInput naming the variable when it is set and not an IP address."""
    if value is None or not value.strip():
        return
    try:
        ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidInput(
            f"POD_IP: {value!r} is not an IP address; set it from the downward API "
            "(fieldRef: status.podIP) or give --peer-advertise HOST:PORT"
        ) from None


def advertise_address(
    *, bound: tuple[str, int], given: str | None, pod_ip: str | None, node_name: str
) -> str:
    """The address other nodes reach this agent's peer server at: ``given`` (``--peer-advertise``),
    else ``$POD_IP:<port>``, else the bound host when it is not a wildcard, else ``<node name>:<port>``
    (``port``: the one bound). IPv6 hosts are bracketed."""
    if given:
        return given
    port = bound[1]
    for host in (pod_ip or "", "" if not bound[0] or is_wildcard(bound[0]) else bound[0], node_name):
        if host.strip():
            return f"{_bracketed(host.strip())}:{port}"
    return f"{node_name}:{port}"


def _bracketed(host: str) -> str:
    try:
        return f"[{host}]" if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address) else host
    except ValueError:
        return host  # a name


class PeerService:
    """Owns the token file and the server for the agent's whole run."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        cache_dir: Path,
        metrics: AgentMetrics,
        node_name: str,
        pod_ip: str | None,
        retry: float = 10.0,
    ) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self.metrics = metrics
        self.node_name = node_name
        self.pod_ip = pod_ip
        self.retry = retry
        self.tokens = TokenFile(config.token_file)
        self.server: PeerServer | None = None
        self.address: str | None = None
        self.waiting: str | None = None  # why it does not serve yet

    def check_token(self) -> None:
        """Read the token file now; InvalidInput (exit 2) when it holds no token."""
        self.tokens.load()

    def state(self) -> PeerState:
        """What the status shows: the address served on, or why nothing is served."""
        problem = self.waiting if self.address is None else self.tokens.problem
        return PeerState(address=self.address, problem=problem)

    async def start(self) -> None:
        """Serve now when the token file holds a token, else note why (:meth:`run` keeps trying).
        Raises InvalidInput (exit 2) when the address cannot be listened on."""
        if await self._token_read():
            await self._serve()

    async def run(self) -> None:
        """Until cancelled (the agent's stop): read the token file every ``retry`` seconds until it
        holds a token and serve; at the end stop the server, within seconds."""
        try:
            while self.server is None:
                await asyncio.sleep(self.retry)
                if await self._token_read():
                    try:
                        await self._serve()
                    except InvalidInput as e:  # the port taken meanwhile: said, and tried again
                        self._wait(str(e))
            await asyncio.Event().wait()
        finally:
            if self.server is not None:
                await asyncio.shield(asyncio.to_thread(self.server.stop))
            self.address = None

    async def _token_read(self) -> bool:
        try:
            await asyncio.to_thread(self.tokens.load)
        except InvalidInput as e:
            self._wait(str(e))
            return False
        return True

    def _wait(self, why: str) -> None:
        if why != self.waiting:
            log.warning("not serving peers: %s (tried again every %.0f s)", why, self.retry)
        self.waiting = why

    async def _serve(self) -> None:
        server = PeerServer(self.cache_dir, self.config.serve, self.tokens, self.metrics)
        bound = await asyncio.to_thread(server.start)
        self.server = server
        if self.waiting is not None:
            log.info("the peer token can be read now: %s", self.config.token_file)
        self.waiting = None
        self.address = advertise_address(
            bound=bound, given=self.config.advertise, pod_ip=self.pod_ip, node_name=self.node_name
        )
        log.info("peers reach this agent at %s", self.address)
