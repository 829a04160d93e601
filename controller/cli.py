"""`modelcache controller`: the cluster controller, over a Kubernetes API server or, with
``--standalone PATH``, over the YAML documents in PATH (caches, node groups, Nodes).

``--once`` reconciles one time and exits. With ``--output json|yaml`` it is a dry run: the cluster
(or the documents) is copied into the embedded backend, reconciled there, and every
LocalModelCache, LocalModelNodeGroup and LocalModelNode is printed with its spec and status, with the
Nodes it labels ready for a model and the serving PVs and PVCs it makes; nothing is written to the
API server.

``--webhook-addr HOST:PORT`` with ``--webhook-cert-dir DIR`` (``tls.crt``, ``tls.key``) also serves the
admission webhooks (:mod:`controller.webhook`) over HTTPS, in every replica, leader or not.

``--metrics-addr HOST:PORT`` (default ``:9091``; ``off`` disables) serves the Prometheus metrics
(:mod:`controller.metrics`) at ``/metrics`` over HTTP, in every replica: a standby reports
``modelcache_controller_is_leader 0`` and no copies. ``--once`` serves none. The same server answers
``/readyz``: 200 while the API server answered within ``--ready-window`` seconds (and, in the leader,
while its Lease is fresh), else 503; the JSON body says leader or standby and why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from controller.labels import MODEL_LABEL_PREFIX
from controller.leader import LEASE_NAME, FencedState, LeaderElector
from controller.metrics import (
    DEFAULT_METRICS_ADDR,
    ControllerMetrics,
    MetricsServer,
    Readiness,
    Role,
    readiness,
)
from controller.peertoken import PEER_TOKEN_NAMESPACE, PEER_TOKEN_SECRET
from controller.reconcile import FIELD_MANAGER, OPTIONAL, WATCHED, Controller, Settings
from controller.serving import MANAGED_BY, MANAGED_BY_LABEL
from controller.snapshot import (
    DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    DEFAULT_ORIGIN_SEEDS,
    DEFAULT_PEERS_PER_MODEL,
)
from controller.webhook import WebhookServer
from localmodel.cliargs import UsageParser, parse_addr, path_arg
from localmodel.documents import load_documents
from localmodel.errors import ClusterStateError, InvalidInput, NotFound
from localmodel.k8snames import subdomain_error
from localmodel.kinds import (
    JSON,
    LEASE,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
)
from localmodel.logs import setup_logging
from localmodel.state.base import ClusterState, Selector
from localmodel.state.kube import KubeState
from localmodel.state.memory import MemoryState

# What a dry run prints: the caches and groups with their status, every LocalModelNode, the nodes the
# controller labelled ready for a model, and the serving PVs and PVCs it made.
PRINTED = (
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE_GROUP,
    LOCAL_MODEL_NODE,
    NODE,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
)
OURS = Selector(labels={MANAGED_BY_LABEL: MANAGED_BY})
ADMISSION_MODES = ("enforce", "warn")
STANDALONE_KINDS = (
    "LocalModelCache",
    "LocalModelNamespaceCache",
    "LocalModelNodeGroup",
    "Node",
    "LocalModelNode",
)


def _parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="modelcache controller", description="The cluster controller.")
    p.add_argument(
        "--standalone",
        metavar="PATH",
        type=path_arg("--standalone", "caches.yaml"),
        help="YAML documents (a file or a folder)",
    )
    p.add_argument("--once", action="store_true", help="reconcile one time and exit")
    p.add_argument("--output", choices=("json", "yaml"), help="with --once: print the objects (dry run)")
    p.add_argument(
        "--max-concurrent-node-downloads",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_DOWNLOADS,
        metavar="N",
        help="nodes fetching one model from its origin at once (0: no limit)",
    )
    p.add_argument(
        "--origin-seeds",
        type=int,
        default=DEFAULT_ORIGIN_SEEDS,
        metavar="N",
        help="with peer fill: nodes that start a model no peer has bytes of yet; the others start "
        "once one of them has bytes to give",
    )
    p.add_argument(
        "--peers-per-model",
        type=int,
        default=DEFAULT_PEERS_PER_MODEL,
        metavar="N",
        help="with peer fill: the most peers one node is told to try for a model",
    )
    p.add_argument(
        "--peer-token-secret",
        default=f"{PEER_TOKEN_NAMESPACE}/{PEER_TOKEN_SECRET}",
        metavar="NAMESPACE/NAME",
        help="the peer-fill token Secret, created when missing, never overwritten (off: not managed)",
    )
    p.add_argument(
        "--admission",
        choices=ADMISSION_MODES,
        default="enforce",
        help="enforce (default): refuse a cache over its group's storageLimit; warn: place it anyway, "
        "with a Warning Event and a StorageOvercommitted condition (for a migration from KServe)",
    )
    p.add_argument("--kubeconfig", metavar="PATH", help="default: in-cluster, $KUBECONFIG, ~/.kube/config")
    p.add_argument("--context", metavar="NAME", help="kubeconfig context")
    p.add_argument("--resync", type=float, default=300.0, metavar="SECONDS", help="full reconcile period")
    p.add_argument(
        "--leader-elect",
        dest="leader_elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold a Lease so that one replica writes (default: on)",
    )
    p.add_argument("--lease-namespace", default="default", metavar="NS", help="where the leader Lease lives")
    p.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="INFO (default)"
    )
    p.add_argument("--webhook-addr", metavar="HOST:PORT", help="serve the admission webhooks (HTTPS) here")
    p.add_argument(
        "--webhook-cert-dir",
        metavar="DIR",
        type=path_arg("--webhook-cert-dir", "/certs"),
        help="tls.crt and tls.key for the webhooks",
    )
    p.add_argument(
        "--ready-window",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="/readyz fails when the API server has not answered for this long",
    )
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help=f"serve Prometheus metrics at /metrics (default {DEFAULT_METRICS_ADDR}; off: none)",
    )
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


@dataclass
class Health:
    """What /readyz reads: filled in as the process finds out its mode, client and elector."""

    window: float
    standalone: bool = False
    kube: KubeState | None = None
    elector: LeaderElector | None = None

    def check(self) -> Readiness:
        role: Role
        if self.standalone:
            role = "standalone"
        elif self.elector is None:
            role = "single"
        else:
            role = "leader" if self.elector.renewed_at is not None else "standby"
        last = self.kube.last_answer if self.kube is not None else None
        ago = None if last is None else time.monotonic() - last
        fenced = self.elector is not None and not self.elector.leading
        return readiness(role=role, api_seconds_ago=ago, window=self.window, fenced=fenced)


async def _keep_in_touch(kube: KubeState, window: float, namespace: str) -> None:
    """Ask the API server something small when nothing else did for a third of the window, so that
    readiness measures the API and not how busy the cluster is."""
    every = window / 3
    while True:
        await asyncio.sleep(every / 2)
        last = kube.last_answer
        if last is None or time.monotonic() - last > every:
            # A 404 is an answer too (last_answer moved); anything else is what readiness reports.
            with contextlib.suppress(ClusterStateError):
                await kube.get(LEASE, LEASE_NAME, namespace=namespace)


@dataclass(frozen=True)
class ControllerSettings:
    """The controller's flags (see :func:`_parser`) and environment, read once in :func:`main`."""

    standalone: Path | None = None  # --standalone: the YAML documents (None: a cluster)
    once: bool = False
    output: str | None = None  # with once: "json" or "yaml" (a dry run)
    max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS  # 0: no limit
    admission: str = "enforce"  # --admission: "enforce" or "warn" (capacity refusals proceed)
    kubeconfig: str | None = None
    context: str | None = None
    resync: float = 300.0  # seconds between full reconciles
    leader_elect: bool = True
    lease_namespace: str = "default"
    webhook_addr: str | None = None  # HOST:PORT (None: no webhooks)
    webhook_cert_dir: Path | None = None
    ready_window: float = 30.0  # seconds
    metrics_addr: str | None = None  # HOST:PORT (None: no metrics server)
    pod_name: str | None = None  # $POD_NAME: the leader identity's prefix (the host name without)
    origin_seeds: int = DEFAULT_ORIGIN_SEEDS  # --origin-seeds
    peers_per_model: int = DEFAULT_PEERS_PER_MODEL  # --peers-per-model
    # --peer-token-secret: (namespace, name); None: off (and always in standalone mode: no agents)
    peer_token_secret: tuple[str, str] | None = (PEER_TOKEN_NAMESPACE, PEER_TOKEN_SECRET)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> ControllerSettings:
        """From the parsed flags (``--metrics-addr off`` or none: no server) and the environment."""
        return cls(
            standalone=args.standalone,
            once=args.once,
            output=args.output,
            max_concurrent_downloads=args.max_concurrent_node_downloads,
            admission=args.admission,
            kubeconfig=args.kubeconfig,
            context=args.context,
            resync=args.resync,
            leader_elect=args.leader_elect,
            lease_namespace=args.lease_namespace,
            webhook_addr=args.webhook_addr,
            webhook_cert_dir=args.webhook_cert_dir,
            ready_window=args.ready_window,
            metrics_addr=None if args.metrics_addr in (None, "off") else args.metrics_addr,
            pod_name=environ.get("POD_NAME") or None,
            origin_seeds=args.origin_seeds,
            peers_per_model=args.peers_per_model,
            peer_token_secret=token_secret_flag(args.peer_token_secret),
        )

    def reconcile(self) -> Settings:
        """The reconcile loop's settings."""
        return Settings(
            max_concurrent_downloads=self.max_concurrent_downloads,
            standalone=self.standalone is not None,
            overcommit=self.admission == "warn",
            origin_seeds=self.origin_seeds,
            peers_per_model=self.peers_per_model,
            # Standalone has no agents' namespace, and a dry run writes nothing anywhere.
            peer_token_secret=None if self.standalone is not None or self.output else self.peer_token_secret,
        )


def token_secret_flag(text: str) -> tuple[str, str] | None:
    """``--peer-token-secret``: ``NAMESPACE/NAME`` as (namespace, name), ``off`` as None. Raises
    InvalidInput naming the flag."""
    if text == "off":
        return None
    namespace, _, name = text.partition("/")
    why = subdomain_error(namespace) or subdomain_error(name)
    if why is not None:
        raise InvalidInput(
            f"--peer-token-secret must be NAMESPACE/NAME (e.g. {PEER_TOKEN_NAMESPACE}/{PEER_TOKEN_SECRET}) "
            f"or off: {why}"
        )
    return namespace, name


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if args.max_concurrent_node_downloads < 0:
        raise InvalidInput("--max-concurrent-node-downloads must be 0 (no limit) or more")
    if args.origin_seeds < 1:
        raise InvalidInput("--origin-seeds must be 1 or more")
    if args.peers_per_model < 1:
        raise InvalidInput("--peers-per-model must be 1 or more")
    token_secret_flag(args.peer_token_secret)
    if args.resync <= 0:
        raise InvalidInput("--resync must be more than 0 seconds")
    if args.output and not args.once:
        raise InvalidInput("--output needs --once")
    if bool(args.webhook_addr) != bool(args.webhook_cert_dir):
        raise InvalidInput("--webhook-addr and --webhook-cert-dir go together")
    if args.webhook_addr and args.once:
        raise InvalidInput("--once does not serve the webhooks; leave out --webhook-addr")
    if args.metrics_addr not in (None, "off"):
        if args.once:
            raise InvalidInput("--once does not serve metrics; leave out --metrics-addr")
        parse_addr(args.metrics_addr, flag="--metrics-addr")
    if args.metrics_addr is None:
        args.metrics_addr = "off" if args.once else DEFAULT_METRICS_ADDR
    setup_logging(args.log_level)
    return asyncio.run(_main(ControllerSettings.from_args(args, os.environ)))


async def _main(opts: ControllerSettings) -> int:
    metrics = ControllerMetrics(CollectorRegistry())
    health = Health(window=opts.ready_window, standalone=opts.standalone is not None)
    if opts.metrics_addr is None:
        return await _serve(opts, metrics, health)
    server = MetricsServer(metrics.registry, opts.metrics_addr, ready=health.check)
    await server.start()  # before leader election: a standby is scraped too (is_leader 0)
    try:
        return await _serve(opts, metrics, health)
    finally:
        await server.stop()


async def _serve(opts: ControllerSettings, metrics: ControllerMetrics, health: Health) -> int:
    settings = opts.reconcile()
    if opts.standalone is None and opts.webhook_addr:
        kube = KubeState.from_environment(opts.kubeconfig, opts.context, component=FIELD_MANAGER)
        try:
            assert opts.webhook_cert_dir is not None  # main() checks they go together
            server = WebhookServer(
                kube, opts.webhook_addr, opts.webhook_cert_dir, overcommit=settings.overcommit
            )
            await server.start()  # before leader election: every replica answers the API server
            try:
                return await _controller(opts, settings, kube, metrics, health)
            finally:
                await server.stop()
        finally:
            await kube.close()
    return await _controller(opts, settings, None, metrics, health)


async def _controller(
    opts: ControllerSettings,
    settings: Settings,
    kube: KubeState | None,
    metrics: ControllerMetrics,
    health: Health | None = None,
) -> int:
    if opts.standalone is not None:
        path: Path = opts.standalone
        memory = MemoryState()
        await load_standalone(memory, path, initial=True)

        async def refresh() -> None:
            await load_standalone(memory, path, initial=False)

        controller = Controller(memory, settings, refresh=None if opts.once else refresh, metrics=metrics)
        if not opts.webhook_addr:
            return await _go(controller, opts, memory)
        assert opts.webhook_cert_dir is not None  # main() checks they go together
        server = WebhookServer(
            memory, opts.webhook_addr, opts.webhook_cert_dir, overcommit=settings.overcommit
        )
        await server.start()
        try:
            return await _go(controller, opts, memory)
        finally:
            await server.stop()
    owned = kube is None
    kube = kube or KubeState.from_environment(opts.kubeconfig, opts.context, component=FIELD_MANAGER)
    touch: asyncio.Task[None] | None = None
    if health is not None and not opts.once:
        health.kube = kube
        touch = asyncio.create_task(_keep_in_touch(kube, health.window, opts.lease_namespace))
    try:
        if opts.once and opts.output:
            memory = MemoryState()
            await copy_state(kube, memory)
            return await _go(Controller(memory, settings, metrics=metrics), opts, memory)
        if opts.once or not opts.leader_elect:
            return await _go(Controller(kube, settings, metrics=metrics), opts, kube)
        elector = LeaderElector(kube, namespace=opts.lease_namespace, pod_name=opts.pod_name)
        if health is not None:
            health.elector = elector
        # Every write of the controller passes the fence: none once the Lease may be someone else's.
        fenced = FencedState(kube, elector)
        return await elector.run_while_leader(
            lambda stop: _go(Controller(fenced, settings, metrics=metrics), opts, fenced, stop)
        )
    finally:
        if touch is not None:
            touch.cancel()
            await asyncio.gather(touch, return_exceptions=True)
        if owned:
            await kube.close()


async def _go(
    controller: Controller, opts: ControllerSettings, state: ClusterState, stop: asyncio.Event | None = None
) -> int:
    """Run the controller: only ever called while this replica leads (or needs no election)."""
    metrics = controller.metrics
    if metrics is not None:
        metrics.is_leader.set(1)
    try:
        return await _run(controller, opts, state, stop)
    finally:
        if metrics is not None:
            metrics.is_leader.set(0)
            metrics.set_copies({})  # a standby's picture would go stale: the new leader reports


async def _run(
    controller: Controller, opts: ControllerSettings, state: ClusterState, stop: asyncio.Event | None
) -> int:
    if opts.once:
        await controller.run(once=True)
        if opts.output:
            _print(await dump(state), opts.output)
        return 0
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await controller.run(resync=opts.resync, stop=stop)
    return 0


async def load_standalone(state: MemoryState, path: Path, *, initial: bool) -> None:
    """The documents under ``path`` into the embedded state. LocalModelNodes in the documents are
    loaded once (a way to give their status in a dry run); later the controller owns them."""
    docs = load_documents(path, kinds=STANDALONE_KINDS)
    for kind in (NODE, LOCAL_MODEL_NODE_GROUP, LOCAL_MODEL_CACHE, LOCAL_MODEL_NAMESPACE_CACHE):
        objs = [d.object for d in docs if d.kind is kind]
        await state.apply(kind, objs, prune=not initial)
    if initial:
        for d in docs:
            if d.kind is LOCAL_MODEL_NODE:
                await state.create(LOCAL_MODEL_NODE, d.object)


async def copy_state(source: ClusterState, target: MemoryState) -> None:
    """Every object the controller reads, with its status and metadata, from ``source``."""
    for kind in WATCHED:
        try:
            listing = await source.list(kind)
        except NotFound:
            if kind not in OPTIONAL:
                raise
            continue  # e.g. KServe's InferenceServices, or no LocalModelNamespaceCache CRD
        for obj in listing.items:
            await target.restore(kind, obj)


async def dump(state: ClusterState) -> list[JSON]:
    out: list[JSON] = []
    for kind in PRINTED:
        mine = kind in (PERSISTENT_VOLUME, PERSISTENT_VOLUME_CLAIM)
        for obj in (await state.list(kind, selector=OURS if mine else None)).items:
            meta = obj.get("metadata") or {}
            if kind is NODE and not any(k.startswith(MODEL_LABEL_PREFIX) for k in meta.get("labels") or {}):
                continue  # a node the controller did not label: input, not a decision
            # What the user wrote and what the controller decided; server bookkeeping is noise.
            for k in ("resourceVersion", "managedFields"):
                meta.pop(k, None)
            out.append(obj)
    return out


def _print(objs: list[JSON], fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(objs, indent=2, sort_keys=False) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False))
