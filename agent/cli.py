"""``modelcache agent``: the node agent, against a Kubernetes API server or, with ``--standalone``,
against YAML documents. The environment is read here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.credentials import JOB_NAMESPACE
from agent.desired import parse_labels
from agent.download.environment import aws_ca_bundle, proxies_from_env
from agent.download.peers import PeerSettings, parse_peers
from agent.download.source_settings import SourceSettings
from agent.http import Servers, health_routes, metrics_routes
from agent.loop import Agent, AgentSettings
from agent.metrics import AgentMetrics
from agent.peer.server import ServeSettings
from agent.peer.service import PeerConfig, PeerService, check_pod_ip, parse_advertise
from agent.peer.token import TokenFile
from agent.pull_cli import folder_error
from agent.standalone import StandaloneSource
from agent.transfer_flags import add_transfer_flags, positive, transfer_settings
from localmodel.cliargs import UsageParser, parse_addr, path_arg
from localmodel.errors import DownloadError, InvalidInput, from_os_error
from localmodel.folders import cache_path_error, unreachable
from localmodel.logs import setup_logging
from localmodel.quantity import parse_rate
from localmodel.state.base import ClusterState
from localmodel.state.memory import MemoryState
from localmodel.text import printable

log = logging.getLogger("modelcache.agent")


def _non_negative(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise InvalidInput(f"{flag}: {text!r} is not a number of seconds") from None
        if not 0 <= value < float("inf"):
            raise InvalidInput(f"{flag}: must be zero or more seconds, got {text}")
        return value

    return parse


def _folder(text: str) -> Path:
    # Path("") is the working folder: an empty value (an unset variable) must not make it the cache.
    if not text.strip():
        raise InvalidInput("--cache-dir: empty; name the cache folder, e.g. --cache-dir /var/lib/modelcache")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    """The agent's flags (over 80 lines because it is one flat list of them, one call each)."""
    p = UsageParser(prog="modelcache agent", description="Keep this node's models in its cache folder.")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node (default: $NODE_NAME)")
    p.add_argument(
        "--cache-dir", type=_folder, required=True, help="the cache folder (the node group's PV path)"
    )
    p.add_argument(
        "--standalone",
        type=path_arg("--standalone", "models.yaml"),
        metavar="PATH",
        help="YAML file or folder instead of an API server",
    )
    p.add_argument("--node-labels", default="", help="standalone: this node's labels, k=v,k2=v2")
    p.add_argument(
        "--health-addr",
        default=":8081",
        help="/healthz, /readyz; /status to loopback clients only (default :8081; 'off')",
    )
    p.add_argument("--metrics-addr", default=":9090", help="/metrics (default :9090; 'off')")
    p.add_argument(
        "--kubeconfig",
        type=path_arg("--kubeconfig", "~/.kube/config"),
        help="a kubeconfig (default: in-cluster, then $KUBECONFIG)",
    )
    p.add_argument("--context", help="the kubeconfig context")
    p.add_argument(
        "--max-concurrent-downloads",
        type=positive("--max-concurrent-downloads"),
        default=2,
        help="models fetched at once (default 2)",
    )
    add_transfer_flags(p, "agent")
    p.add_argument("--resync", type=positive("--resync", float), default=60.0, help="seconds (60)")
    p.add_argument(
        "--retry-min", type=positive("--retry-min", float), default=300.0, help="first retry after (300 s)"
    )
    p.add_argument(
        "--retry-max", type=positive("--retry-max", float), default=3600.0, help="longest (3600 s)"
    )
    p.add_argument(
        "--status-interval",
        type=positive("--status-interval", float),
        default=2.0,
        help="seconds: the status is written at most this often, and only when it changed (2)",
    )
    p.add_argument(
        "--eviction-grace",
        type=_non_negative("--eviction-grace"),
        default=None,
        help="seconds a model that left the spec is kept before it is deleted (cluster mode 300, "
        "standalone 0)",
    )
    p.add_argument(
        "--ready-window",
        type=positive("--ready-window", float),
        default=60.0,
        help="/readyz fails once the API server has not answered for this many seconds (60)",
    )
    p.add_argument(
        "--admission",
        choices=("enforce", "warn"),
        default="enforce",
        help="enforce (default): refuse a model over its node group's storageLimit; warn: fetch it while "
        "the filesystem has room, with a warning (as the controller's --admission warn places it)",
    )
    p.add_argument("--verify-on-start", action="store_true", help="re-hash every published file at start")
    p.add_argument("--once", action="store_true", help="exit once every model is downloaded or failed")
    p.add_argument(
        "--allow-file-sources",
        metavar="PREFIX",
        action="append",
        default=[],
        help="cluster mode: file:// sources (and absolute paths) may be read under this folder "
        "(repeatable or comma-separated; default: none; standalone mode allows any)",
    )
    p.add_argument(
        "--credentials-namespace",
        default=JOB_NAMESPACE,
        metavar="NS",
        help="where a cache's serviceAccountName and storage.key (the storage-config Secret) are read: "
        f"KServe's jobNamespace (default {JOB_NAMESPACE}); standalone: the namespace of the Secret and "
        "ServiceAccount documents",
    )
    p.add_argument(
        "--allow-private-sources",
        action="store_true",
        help="cluster mode: sources may be on loopback, link-local or unspecified addresses "
        "(127.0.0.1, 169.254.169.254, 0.0.0.0; refused by default; standalone mode allows them)",
    )
    # Peer fill, serving side (agent.peer): this node's models given to the other nodes' agents.
    p.add_argument(
        "--peer-addr",
        metavar="HOST:PORT",
        help="serve what this node holds to other nodes' agents on this address (default: off; the "
        "DaemonSet sets 0.0.0.0:7071); needs --peer-token-file",
    )
    p.add_argument(
        "--peer-advertise",
        type=parse_advertise,
        metavar="HOST:PORT",
        help="the address other nodes reach the peer server at (default: $POD_IP:<port>, else the "
        "--peer-addr host unless 0.0.0.0, else the node name:<port>)",
    )
    p.add_argument(
        "--peer-token-file",
        type=path_arg("--peer-token-file", "/var/run/modelcache/peer/token"),
        metavar="PATH",
        help="the cluster's peer token (the modelcache-peer-token Secret, read again when it changes): "
        "required with --peer-addr and --peers; with it, downloads take what peers hold before "
        "asking the source",
    )
    p.add_argument(
        "--peer-max-upload-rate",
        type=lambda text: parse_rate(text, flag="--peer-max-upload-rate"),
        metavar="RATE",
        help="a cap in bytes/s for all uploads to peers together, e.g. 500MB/s (default: none; "
        "--max-bandwidth caps downloads apart)",
    )
    p.add_argument(
        "--peer-max-uploads",
        type=positive("--peer-max-uploads"),
        help="files sent to peers at once; more are answered 503, to ask elsewhere (8)",
    )
    p.add_argument(
        "--peers",
        default="",
        metavar="HOST:PORT,...",
        help="standalone: peers to ask for a model's bytes before its source, nearest first (needs "
        "--peer-token-file); in a cluster the controller lists them per model",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="INFO (default); libraries that print headers stay at INFO under DEBUG",
    )
    return p


def file_prefixes(values: Sequence[str], *, standalone: bool) -> tuple[str, ...] | None:
    """The folders file sources may be read from: any (None) in standalone mode, else the real paths
    (links resolved) of the absolute paths given to ``--allow-file-sources`` (none by default).
    InvalidInput for a relative path, ``/``, or one that cannot be resolved (a folder this user may
    not enter, a loop of links)."""
    if standalone:
        return None
    prefixes = tuple(p.strip() for value in values for p in value.split(",") if p.strip())
    real = []
    for prefix in prefixes:
        if not prefix.startswith("/"):
            raise InvalidInput(f"--allow-file-sources: {prefix!r} is not an absolute path")
        try:
            resolved = Path(prefix).resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a loop of symbolic links
            why = getattr(e, "strerror", None) or "a loop of symbolic links"
            raise InvalidInput(
                f"--allow-file-sources: {printable(prefix)!r} cannot be resolved ({why}); name a folder "
                "the agent can read"
            ) from None
        if resolved == Path("/"):
            raise InvalidInput("--allow-file-sources: '/' would allow every file of the node; name a folder")
        real.append(str(resolved))
    # Resolved once here: the listing compares real paths with these, and never resolves them again.
    return tuple(real)


def peer_fill(token_file: Path | None, peers: str, *, standalone: bool = True) -> PeerSettings | None:
    """Peer fill's settings, on with ``--peer-token-file`` (the same :class:`TokenFile` rules the
    peer server checks requests by). Standalone, a file that holds no token is bad input (exit 2);
    in a cluster the Secret may not exist yet (the controller makes it, the DaemonSet mounts it
    optional): peers are asked once it holds a token, the origin until then."""
    if token_file is None:
        if parse_peers(peers):
            raise InvalidInput("--peers needs --peer-token-file: the cluster token the peers accept")
        return None
    tokens = TokenFile(token_file)
    try:
        tokens.load()
    except InvalidInput:
        if standalone:
            raise
    return PeerSettings(token=functools.partial(_token_to_send, tokens), previous_token=tokens.previous)


def _token_to_send(tokens: TokenFile) -> str:
    token = tokens.current()
    if not token:
        # The peer is then not asked (peerfetch drops it for this model with this reason).
        raise DownloadError(f"no peer token yet ({tokens.problem or f'{tokens.path} holds none'})")
    return token


def check_cache_dir(raw: Path) -> Path:
    """``--cache-dir`` -> the absolute, normalised folder, or InvalidInput (exit 2) when it can never be
    one: a system folder or ``/`` (:func:`localmodel.resources.cache_path_error`, also through a
    link), a file, a read-only filesystem or a folder this user may not write."""
    path = Path(os.path.normpath(raw.absolute()))
    try:
        real = path.resolve()
    except OSError as e:  # a folder above it this user may not search
        raise InvalidInput(f"--cache-dir: {unreachable(path, e)}") from None
    for candidate in (path, real):
        if (problem := cache_path_error(str(candidate), cluster=False)) is not None:
            raise InvalidInput(f"--cache-dir: {problem}")
    if (problem := folder_error(path)) is not None:
        raise InvalidInput(f"--cache-dir: {problem}")
    return path


def disable_core_dumps() -> None:
    """No core file (it would hold the HF token and AWS credentials in memory) and, on Linux, not
    dumpable (PR_SET_DUMPABLE 0: no core, and no ptrace or /proc/<pid>/mem by other processes of
    the same user). Best effort: an environment that forbids either keeps running."""
    import contextlib
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            pr_set_dumpable = 4  # <linux/prctl.h>
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


# The flags that set the peer server up: meaningless without --peer-addr, so refused without it.
_SERVING_FLAGS = {
    "peer_advertise": "--peer-advertise",
    "peer_max_uploads": "--peer-max-uploads",
    "peer_max_upload_rate": "--peer-max-upload-rate",
}


def peer_config(args: argparse.Namespace, *, chunk_size: int, pod_ip: str | None = None) -> PeerConfig | None:
    """``--peer-*`` -> the peer server's settings; None without ``--peer-addr``. InvalidInput for a
    bad address, ``--peer-addr`` without ``--peer-token-file``, a serving flag without
    ``--peer-addr`` (it would do nothing), or ``pod_ip`` (``$POD_IP``, advertised by default) set
    and not an IP address."""
    if args.peer_addr is None or args.peer_addr == "off":
        for dest, flag in _SERVING_FLAGS.items():
            if getattr(args, dest) is not None:
                raise InvalidInput(
                    f"{flag} sets up the peer server, which is off: add --peer-addr HOST:PORT "
                    f"(e.g. 0.0.0.0:7071) or drop {flag}"
                )
        return None
    if args.peer_advertise is None:
        check_pod_ip(pod_ip)
    if args.peer_token_file is None:
        raise InvalidInput(
            "--peer-addr needs --peer-token-file: name the file holding the cluster's peer token, "
            "e.g. --peer-token-file /var/run/modelcache/peer/token"
        )
    return PeerConfig(
        serve=ServeSettings(
            bind=parse_addr(args.peer_addr, flag="--peer-addr"),
            max_upload_rate=args.peer_max_upload_rate,
            max_uploads=int(args.peer_max_uploads or ServeSettings.max_uploads),
            chunk_size=chunk_size,
        ),
        token_file=args.peer_token_file,
        advertise=args.peer_advertise,
    )


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if not args.node_name:
        raise InvalidInput("--node-name is required (or set NODE_NAME, e.g. from the pod's spec.nodeName)")
    if args.retry_max < args.retry_min:
        raise InvalidInput("--retry-max must be at least --retry-min")
    try:
        odd = args.standalone is not None and (
            args.standalone.exists() and not (args.standalone.is_file() or args.standalone.is_dir())
        )
    except OSError as e:  # the file, or a folder above it, this user may not look at
        raise InvalidInput(f"--standalone: {unreachable(args.standalone, e)}") from None
    if odd:
        # /dev/null, a FIFO, a socket: read as "no such file" further down, which it is not.
        raise InvalidInput(
            f"--standalone: {printable(str(args.standalone))} is not a regular file or a folder; pass a "
            "YAML file or a folder of them"
        )
    setup_logging(args.log_level, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_core_dumps()
    # In a cluster a spec's URI must not reach the node's own services or the cloud metadata
    # service; standalone, the documents are the user's own word.
    private = args.standalone is not None or args.allow_private_sources
    settings = AgentSettings(
        node_name=args.node_name,
        cache_dir=check_cache_dir(args.cache_dir),
        max_downloads=args.max_concurrent_downloads,
        resync=args.resync,
        status_interval=args.status_interval,
        retry_base=args.retry_min,
        retry_cap=args.retry_max,
        verify_on_start=args.verify_on_start,
        # In a cluster another writer may flap the spec (KServe's own controller left running); in
        # standalone mode the documents are the user's own word.
        eviction_grace=args.eviction_grace
        if args.eviction_grace is not None
        else (0.0 if args.standalone is not None else 300.0),
        ready_window=args.ready_window,
        credentials_namespace=args.credentials_namespace,
        overcommit=args.admission == "warn",
        transfer=transfer_settings(
            args,
            proxies=proxies_from_env(),
            ca_bundle=aws_ca_bundle(),
            allow_private=private,
        ),
        peer_fill=peer_fill(args.peer_token_file, args.peers, standalone=args.standalone is not None),
        peers=parse_peers(args.peers),
        sources=SourceSettings.from_env(
            file_prefixes=file_prefixes(args.allow_file_sources, standalone=args.standalone is not None),
            allow_private=private,
        ),
    )
    labels = parse_labels(args.node_labels)
    health = None if args.health_addr == "off" else parse_addr(args.health_addr, flag="--health-addr")
    metrics = None if args.metrics_addr == "off" else parse_addr(args.metrics_addr, flag="--metrics-addr")
    peer = peer_config(args, chunk_size=settings.transfer.chunk_size, pod_ip=os.environ.get("POD_IP"))
    return asyncio.run(
        _run(args, settings=settings, labels=labels, health=health, metrics_addr=metrics, peer=peer)
    )


def _peer_service(
    peer: PeerConfig | None, settings: AgentSettings, metrics: AgentMetrics, *, standalone: bool
) -> PeerService | None:
    if peer is None:
        return None
    service = PeerService(
        peer,
        cache_dir=settings.cache_dir,
        metrics=metrics,
        node_name=settings.node_name,
        pod_ip=os.environ.get("POD_IP"),
    )
    if standalone:
        # The user's own path: a typo is said now (exit 2). In a cluster the Secret may come later.
        service.check_token()
    return service


async def _serve_peers(service: PeerService | None) -> asyncio.Task[None] | None:
    """Start serving (a taken address: InvalidInput, exit 2) and keep at it in a task."""
    if service is None:
        return None
    await service.start()
    return asyncio.create_task(service.run(), name="peer-server")


async def _state_of(
    args: argparse.Namespace, settings: AgentSettings, labels: dict[str, str]
) -> tuple[ClusterState, StandaloneSource | None]:
    """The cluster state the agent works against: the API server, or standalone documents kept in
    memory (their source, which keeps them up to date, returned with it)."""
    source: StandaloneSource | None = None
    state: ClusterState
    if args.standalone is not None:
        memory = MemoryState()
        source = StandaloneSource(
            args.standalone,
            node_name=settings.node_name,
            labels=labels,
            state=memory,
            exclude=(settings.cache_dir,),
            credentials_namespace=settings.credentials_namespace,
            overcommit=settings.overcommit,
        )
        if not await source.load(report=not args.once) and args.once:
            # Nothing to settle on: --once would wait forever. (As a daemon the status says why,
            # and an edit of the documents is picked up.)
            raise InvalidInput(f"--standalone: {source.error}")
        state = memory
    else:
        from localmodel.state.kube import KubeState

        state = KubeState.from_environment(
            kubeconfig=str(args.kubeconfig) if args.kubeconfig else None,
            context=args.context,
            component="modelcache-agent",
        )
    return state, source


async def _run(
    args: argparse.Namespace,
    *,
    settings: AgentSettings,
    labels: dict[str, str],
    health: tuple[str, int] | None,
    metrics_addr: tuple[str, int] | None,
    peer: PeerConfig | None = None,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    agent_metrics = AgentMetrics(registry)
    service = _peer_service(peer, settings, agent_metrics, standalone=args.standalone is not None)
    state, source = await _state_of(args, settings, labels)
    agent = Agent(
        state=state,
        settings=settings,
        metrics=agent_metrics,
        source_error=(lambda: source.error) if source is not None else (lambda: None),
        refused=(lambda: source.refused) if source is not None else (lambda: ()),
        peer=service.state if service is not None else (lambda: None),
    )
    routes: dict[tuple[str, int], list] = {}  # type: ignore[type-arg]
    names: dict[str, tuple[str, int]] = {}
    if health is not None:
        routes.setdefault(health, []).extend(health_routes(ready=agent.readiness, status=agent.snapshot))
        names["health"] = health
    if metrics_addr is not None:
        routes.setdefault(metrics_addr, []).extend(metrics_routes(registry))
        names["metrics"] = metrics_addr
    servers = Servers()
    await servers.start(routes, names)
    try:
        serving = await _serve_peers(service)
    except BaseException:
        await servers.stop()
        raise
    poller = asyncio.create_task(source.run()) if source is not None else None
    try:
        code = await agent.run(stop, once=args.once)
    except OSError as e:  # the cache folder failing under the agent (checked writable at start)
        raise from_os_error(e) from e
    finally:
        if poller is not None:
            poller.cancel()
        if serving is not None:
            serving.cancel()
            await asyncio.wait([serving])
        await servers.stop()
        await state.close()
    if stop.is_set():
        log.info("stopped on signal; partial downloads resume at the next start")
        return 0
    return code
