"""The agent's HTTP endpoints: ``/healthz``, ``/readyz`` and ``/status`` on the health address, the
Prometheus exposition on the metrics address (the same server when both addresses are equal).

``/status`` names every model's source and the node's cache: it answers loopback clients only
(``kubectl port-forward`` and a shell in the pod are loopback), 403 to anyone else. The probes stay
open to the kubelet, which connects from the node's address. One listener, so no second port to
take on a host-network pod and nothing to configure.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from localmodel.errors import InvalidInput
from localmodel.kinds import JSON

log = logging.getLogger("modelcache.agent")


def health_routes(*, ready: Callable[[], tuple[bool, str]], status: Callable[[], JSON]) -> list[web.RouteDef]:
    """``ready`` says (ready, why) for ``/readyz``."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, why = ready()
        if ok:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def status_handler(request: web.Request) -> web.Response:
        if not is_loopback(request.remote):
            return web.Response(
                status=403,
                text="/status answers loopback clients only: use kubectl port-forward, or "
                "modelcache status --cache-dir DIR on the node\n",
            )
        return web.Response(text=json.dumps(status(), indent=1) + "\n", content_type="application/json")

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/status", status_handler)]


def is_loopback(remote: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms; False for anything else or unknown."""
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def metrics_routes(registry: CollectorRegistry) -> list[web.RouteDef]:
    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    return [web.get("/metrics", metrics)]


class Servers:
    """Starts one aiohttp site per distinct address; ``bound`` tells the ports actually taken."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.bound: dict[str, tuple[str, int]] = {}

    async def start(
        self, routes: dict[tuple[str, int], list[web.RouteDef]], names: dict[str, tuple[str, int]]
    ) -> None:
        sites: dict[tuple[str, int], tuple[str, int]] = {}
        for addr, route_list in routes.items():
            app = web.Application()
            app.add_routes(route_list)
            # A probe or a scrape sends its headers at once: an idle or slow connection is closed
            # after 10 s (aiohttp's default keeps one an hour).
            runner = web.AppRunner(app, access_log=None, keepalive_timeout=10.0)
            await runner.setup()
            site = web.TCPSite(runner, addr[0], addr[1])
            try:
                await site.start()
            except OSError as e:
                # A taken port or an address not on this host is a usage error, said in one line.
                await runner.cleanup()
                await self.stop()
                flags = " and ".join(f"--{name}-addr" for name, a in names.items() if a == addr)
                why = e.strerror or str(e)
                raise InvalidInput(f"{flags}: cannot listen on {addr[0]}:{addr[1]}: {why}") from e
            self.runners.append(runner)
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            port = sockets[0].getsockname()[1] if sockets else addr[1]
            sites[addr] = (addr[0], port)
            log.info("listening on %s:%d (%s)", addr[0], port, ", ".join(r.path for r in route_list))
        self.bound = {name: sites[addr] for name, addr in names.items()}

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
