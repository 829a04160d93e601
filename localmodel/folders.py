"""Which node folders may hold a cache: the one rule for the CRD, the controller and the agent.

A cache folder is written and deleted by the agent as root on the node, so a folder of the node's
system (or a shared parent of such folders) would be a node takeover through ``hostPath``. The same
list is the group webhook's rule (through the parser), the controller's serving-volume policy and the
agent's init container (see :data:`SYSTEM_FOLDERS`). The CRD carries no rule on the path: KServe's
CRD has none, and ours over KServe's must keep every group KServe stored valid (issue 16).
"""

from __future__ import annotations

# Folders of the node's system a cache folder may not be, nor be under: the node's configuration,
# kernel interfaces, binaries and libraries, runtime sockets, root's home, logs, world-writable
# scratch, and the kubelet's, the container runtimes', the network plugins' and the distributions'
# state (hostPath on them is a node takeover). /lib* also covers lib32, lib64, libx32.
# The one list: the group webhook reads it through the parser (:func:`cache_path_error`), and the
# controller's serving-volume policy (manifests/controller/admission-policy.yaml,
# :func:`system_folder_cel`) and the agent's init container (manifests/agent/daemonset.yaml,
# :func:`system_folder_case`) are generated from it; tests keep them equal and run each against
# :func:`cache_path_error`.
SYSTEM_FOLDERS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/opt/cni",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/snap",
    "/sys",
    "/usr",
    "/var/lib/calico",
    "/var/lib/cilium",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/var/lib/containers",
    "/var/lib/crio",
    "/var/lib/docker",
    "/var/lib/etcd",
    "/var/lib/k0s",
    "/var/lib/kubelet",
    "/var/lib/rancher",
    "/var/log",
    "/var/run",
    "/var/snap",
)
# World-writable scratch (anyone on the node may plant a link there first): refused as a cache
# folder, and everything under them, in a cluster (the CRD, the group webhook, the agent's init
# container). Standalone mode, the user's own machine, may use them (the quickstart does).
SCRATCH_FOLDERS = ("/tmp", "/var/tmp")  # noqa: S108 (folders refused, not used)
# Folders that are refused as a whole, while a folder of its own below them is fine
# (/mnt/disks/ssd0, /srv/modelcache, /var/lib/modelcache): ancestors of system folders and the
# places other software and users share (a cache there would take over their files).
SYSTEM_PARENTS = ("/", "/home", "/media", "/mnt", "/opt", "/srv", "/var", "/var/lib")
# A path may hold no C0 control character nor DEL (a newline splits log lines and shell words; a
# NUL cuts the path the kernel sees).
_CONTROL_CHARS = frozenset(chr(c) for c in (*range(0x20), 0x7F))
_SYSTEM_MESSAGE = "is (or is under) a system folder: give a folder of its own, e.g. /var/lib/modelcache"
_PARENT_MESSAGE = "is a shared system folder: give a folder of its own below it, e.g. /var/lib/modelcache"


def cache_path_error(path: object, *, cluster: bool = True) -> str | None:
    """Why ``path`` cannot be a node's cache folder, or None when it can.

    Rules: a string, absolute, no control character, normalised (no empty, ``.`` or ``..`` segment,
    no trailing ``/``), at most 4096 bytes (PATH_MAX), not one of :data:`SYSTEM_PARENTS` itself, not
    a system folder (:data:`SYSTEM_FOLDERS`, ``/lib*``, and in a ``cluster`` :data:`SCRATCH_FOLDERS`)
    nor anything under one.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        return f"expected an absolute path, got {path!r}"
    if len(path.encode()) > 4096:
        return "is longer than 4096 bytes"
    if any(c in _CONTROL_CHARS for c in path):
        return f"{path!r} holds a control character"
    if path in SYSTEM_PARENTS:
        return f"{path!r} {_PARENT_MESSAGE}"
    segments = path[1:].split("/")
    if any(s in ("", ".", "..") for s in segments):
        return f"{path!r} is not a normalised path (no '//', '.', '..' or trailing '/')"
    top = "/" + segments[0]
    folders = SYSTEM_FOLDERS + SCRATCH_FOLDERS if cluster else SYSTEM_FOLDERS
    if top.startswith("/lib") or any(path == f or path.startswith(f + "/") for f in folders):
        return f"{path!r} {_SYSTEM_MESSAGE}"
    return None


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{f}'" for f in items) + "]"


def system_folder_cel(path: str) -> str:
    """A CEL expression, true when the string ``path`` (a CEL expression) is or is under a system
    folder in a cluster (:data:`SYSTEM_FOLDERS`, :data:`SCRATCH_FOLDERS`, ``/lib*``)."""
    folders = _cel_list(tuple(sorted(SYSTEM_FOLDERS + SCRATCH_FOLDERS)))
    return (
        f"{folders}.exists(f, {path} == f || {path}.startsWith(f + '/')) || {path}.matches('^/lib[^/]*(/|$)')"
    )


def system_folder_case() -> str:
    """The ``case`` pattern of the agent's init container (POSIX sh) that matches a system folder,
    anything under one, and the shared parents themselves: what :func:`cache_path_error` calls a
    system folder."""
    folders = sorted(SYSTEM_FOLDERS + SCRATCH_FOLDERS)
    return "|".join([*SYSTEM_PARENTS, *(p for f in folders for p in (f, f + "/*")), "/lib*"])


def unreachable(path: object, e: OSError) -> str:
    """The one line for a folder a user named that this user cannot look at (``e``: the OSError of
    the stat, open or access, whose filename is the path that failed, often a folder above
    ``path``): what and where, and the fix. Callers prefix the flag (``--cache-dir: ``, ``DEST: ``)
    and raise it as bad input (exit 2)."""
    import errno
    import os

    from localmodel.text import printable

    where = printable(str(e.filename if e.filename is not None else path))
    why = e.strerror or type(e).__name__
    fix = (
        "give this user search (x) permission on every folder above it, or name another folder"
        if e.errno in (errno.EACCES, errno.EPERM)
        else "name another folder"
    )
    who = f"this user (uid {os.getuid()})"
    return f"{printable(str(path))} cannot be looked at by {who}: {why} ({where}); {fix}"
