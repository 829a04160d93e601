"""Multi-node bring-up with Ray: the head waits for GPUs, workers wait for the head.

KServe's script waited until Ray reported the expected *node count*; a node that joined without its
GPUs (or with fewer) then hung vLLM's placement group (vLLM #13909). The head here waits until Ray
reports at least TP x PP GPUs, and a timeout names the nodes and GPUs it saw. Commands run through an
injected :data:`Runner` so the waiting logic is tested without Ray.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from localmodel.errors import InvalidInput, ModelcacheError

RAY_PORT = 6379


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str], float], CommandResult]
Sleeper = Callable[[float], None]
Clock = Callable[[], float]


def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """The real runner: a missing command or a hang reads as a failed result, never an exception."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"{argv[0]}: no answer in {timeout:g} s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class ClusterView:
    """What ``ray status`` reported: live nodes, total GPUs and the GPU models Ray registered."""

    nodes: int = 0
    gpus: float = 0.0
    accelerators: tuple[str, ...] = ()
    node_ids: tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        kinds = f" ({', '.join(self.accelerators)})" if self.accelerators else ""
        return f"{self.nodes} node{'s' if self.nodes != 1 else ''} and {self.gpus:g} GPUs{kinds}"


_ACTIVE_NODE = re.compile(r"^\s*(\d+)\s+(node_[0-9a-fA-F]+)")
_RESOURCE = re.compile(r"^\s*([\d.]+)\s*/\s*([\d.]+)\s+(\S+)\s*$")


def parse_ray_status(text: str) -> ClusterView:
    """Parse ``ray status`` (Ray 2.x: "Usage:" or "Total Usage:" sections; "Active:"/"Idle:" nodes)."""
    section = ""
    nodes = 0
    ids: list[str] = []
    gpus = 0.0
    accelerators: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and not stripped.startswith("("):
            section = stripped[:-1].lower()
            continue
        # Ray ≥ 2.10 lists nodes with nothing running under "Idle:", older ones all under "Active:".
        if section in ("active", "idle"):
            m = _ACTIVE_NODE.match(line)
            if m:
                nodes += int(m.group(1))
                ids.append(m.group(2))
        elif section in ("usage", "total usage"):
            m = _RESOURCE.match(line)
            if not m:
                continue
            name = m.group(3)
            if name == "GPU":
                gpus = float(m.group(2))
            elif name.startswith("accelerator_type:"):
                accelerators.append(name.split(":", 1)[1])
    return ClusterView(nodes, gpus, tuple(sorted(set(accelerators))), tuple(ids))


def head_start_command(node_ip: str | None, gpus: int, port: int = RAY_PORT) -> list[str]:
    argv = ["ray", "start", "--head", f"--port={port}", f"--num-gpus={gpus}", "--disable-usage-stats"]
    if node_ip:
        argv.append(f"--node-ip-address={node_ip}")
    return argv


def worker_start_command(head: str, node_ip: str | None, gpus: int) -> list[str]:
    # --block keeps the worker in the foreground: the pod lives as long as its raylet.
    argv = ["ray", "start", f"--address={head}", f"--num-gpus={gpus}", "--block", "--disable-usage-stats"]
    if node_ip:
        argv.append(f"--node-ip-address={node_ip}")
    return argv


def head_address(head_svc: str | None, port: int = RAY_PORT) -> str:
    if not head_svc:
        raise InvalidInput(
            "HEAD_SVC is not set: a Ray worker needs the head's service name (KServe sets it on "
            "multi-node InferenceServices); set HEAD_SVC=<head service>"
        )
    return head_svc if ":" in head_svc else f"{head_svc}:{port}"


def wait_for_gpus(
    need: int,
    *,
    timeout: float,
    runner: Runner = run_command,
    sleep: Sleeper = time.sleep,
    clock: Clock = time.monotonic,
    interval: float = 2.0,
    address: str | None = None,
) -> ClusterView:
    """Poll ``ray status`` until Ray reports ``need`` GPUs; refuse mixed GPU models as soon as seen."""
    argv = ["ray", "status"] + ([f"--address={address}"] if address else [])
    deadline = clock() + timeout
    interval = min(interval, max(0.1, timeout / 10))
    seen = ClusterView()
    last_error = ""
    while True:
        result = runner(argv, 30.0)
        if result.returncode == 0:
            seen = parse_ray_status(result.stdout)
            last_error = ""
            if len(seen.accelerators) > 1:
                raise InvalidInput(
                    f"Ray reports GPUs of different models ({', '.join(seen.accelerators)}): vLLM needs one "
                    "GPU model on every node; schedule the head and workers onto one GPU type"
                )
            if seen.gpus >= need:
                return seen
        else:
            lines = (result.stderr or result.stdout).strip().splitlines()
            last_error = lines[-1] if lines else f"exit status {result.returncode}"
        if clock() >= deadline:
            tail = f"; last `ray status` error: {last_error}" if last_error else ""
            raise ModelcacheError(
                f"waited {timeout:g} s for Ray to report {need} GPUs; it saw {seen.describe()}"
                f"{' ' + ', '.join(seen.node_ids) if seen.node_ids else ''}{tail}. Check that every "
                "worker pod is running and reaches the head on port 6379"
            )
        sleep(interval)


def wait_for_head(
    address: str,
    *,
    timeout: float,
    runner: Runner = run_command,
    sleep: Sleeper = time.sleep,
    clock: Clock = time.monotonic,
    first_delay: float = 1.0,
    max_delay: float = 15.0,
) -> int:
    """Wait with exponential backoff until ``ray health-check`` answers at ``address``; the tries."""
    deadline = clock() + timeout
    delay = first_delay
    tries = 0
    while True:
        tries += 1
        result = runner(["ray", "health-check", f"--address={address}"], 30.0)
        if result.returncode == 0:
            return tries
        if clock() >= deadline:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ModelcacheError(
                f"the Ray head at {address} did not answer in {timeout:g} s ({tries} tries"
                f"{'; last: ' + detail[-1] if detail else ''}); check that the head pod is running "
                "and HEAD_SVC names its service"
            )
        sleep(min(delay, max(0.0, deadline - clock())))
        delay = min(delay * 2, max_delay)
