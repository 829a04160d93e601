"""The agent's Prometheus metrics. They live in a registry passed in (tests build a fresh one); the
docs/metrics.md lists every one of them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A model download takes seconds to hours: buckets cover all of it.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        """Every metric, registered in ``registry`` (over 80 lines because it is one flat list of
        them, one call each)."""
        self.registry = registry
        self.bytes_downloaded = Counter(
            "modelcache_downloaded_bytes",
            "Bytes fetched from model sources (resumed bytes are not counted again).",
            registry=registry,
        )
        self.download_seconds = Histogram(
            "modelcache_download_duration_seconds",
            "Wall time of completed model downloads, from start (or resume) to publish.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "modelcache_downloads_in_flight", "Model downloads running now.", registry=registry
        )
        self.pending = Gauge(
            "modelcache_downloads_pending",
            "Models waiting for a download slot or for their retry time.",
            registry=registry,
        )
        self.completed = Counter(
            "modelcache_downloads_completed", "Model downloads published.", registry=registry
        )
        self.failures = Counter(
            "modelcache_download_failures",
            "Failed model downloads, by reason (AccessDenied, SourceNotFound, IntegrityError, ...).",
            ["reason"],
            registry=registry,
        )
        self.verification_failures = Counter(
            "modelcache_verification_failures",
            "Downloads that failed because bytes did not match the source's size or checksum.",
            registry=registry,
        )
        self.refusals = Counter(
            "modelcache_refusals",
            "Models refused for capacity, by reason (InsufficientStorage, SizeExceedsDeclared).",
            ["reason"],
            registry=registry,
        )
        self.bytes_adopted = Counter(
            "modelcache_adopted_bytes",
            "Bytes found already in place and kept when a folder another writer filled (KServe's "
            "agent) was adopted: not fetched.",
            registry=registry,
        )
        self.evictions = Counter(
            "modelcache_evictions",
            "Models deleted from the cache because no longer wanted.",
            registry=registry,
        )
        self.models_cached = Gauge(
            "modelcache_models_cached", "Models published in the cache folder.", registry=registry
        )
        self.bytes_cached = Gauge(
            "modelcache_cached_bytes", "Bytes of the published models.", registry=registry
        )
        self.limit_bytes = Gauge(
            "modelcache_storage_limit_bytes",
            "The node groups' storageLimit for this node (0 when none is known).",
            registry=registry,
        )
        self.disk_capacity = Gauge(
            "modelcache_disk_capacity_bytes", "Size of the cache folder's filesystem.", registry=registry
        )
        self.disk_used = Gauge(
            "modelcache_disk_used_bytes", "Used bytes on the cache folder's filesystem.", registry=registry
        )
        # Peer fill (receiving side): where downloaded bytes came from.
        self.bytes_by_source = Counter(
            "modelcache_download_bytes",
            "Bytes of completed downloads by where they came from: origin (the model's source) or "
            "peer (another node's agent).",
            ["source"],
            registry=registry,
        )
        self.peers_dropped = Counter(
            "modelcache_peers_dropped",
            "Peers a download stopped using (a failure, a stall, bad bytes), by kind: bad_bytes or failed.",
            ["kind"],
            registry=registry,
        )
        # Every series from the start, at 0: a node that never used a peer shows that, not no data.
        for source in ("origin", "peer"):
            self.bytes_by_source.labels(source)
        for kind in ("bad_bytes", "failed"):
            self.peers_dropped.labels(kind)
        self.disk_available = Gauge(
            "modelcache_disk_available_bytes",
            "Free bytes on the cache folder's filesystem (for unprivileged users).",
            registry=registry,
        )
        # Peer fill, serving side (agent.peer.server): what this node gave the other nodes.
        self.peer_upload_bytes = Counter(
            "modelcache_peer_upload_bytes",
            "Bytes of model files served to other nodes' agents (peer fill).",
            registry=registry,
        )
        self.peer_requests = Counter(
            "modelcache_peer_requests",
            "Requests to the peer server, by HTTP status code (401: no valid token; 503: over "
            "--peer-max-uploads; 499: the peer hung up).",
            ["code"],
            registry=registry,
        )
        self.peer_uploads_in_flight = Gauge(
            "modelcache_peer_uploads_in_flight",
            "File answers the peer server is sending now.",
            registry=registry,
        )
