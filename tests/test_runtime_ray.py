"""The Ray bring-up logic: `ray status` parsing, the head waiting for GPUs, a worker waiting for the head.

The `ray` command is replaced by a scripted runner (Ray itself is not installed in the default test
environment); the waiting, backoff and timeout logic under test is the real one, on a fake clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from localmodel.errors import InvalidInput, ModelcacheError
from runtime.ray import (
    ClusterView,
    CommandResult,
    head_address,
    head_start_command,
    parse_ray_status,
    wait_for_gpus,
    wait_for_head,
    worker_start_command,
)

DATA = Path(__file__).parent / "data" / "runtime"


def status(name: str) -> str:
    return (DATA / f"ray_status_{name}.txt").read_text()


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """Answers each command with the next scripted result (the last one repeats)."""

    def __init__(self, *results: CommandResult) -> None:
        self.results = list(results)
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.calls.append(list(argv))
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]


def test_parse_two_nodes() -> None:
    view = parse_ray_status(status("two_nodes"))
    assert view == ClusterView(nodes=2, gpus=16.0, accelerators=("H100",))
    assert view.describe() == "2 nodes and 16 GPUs (H100)"
    assert len(view.node_ids) == 2


def test_parse_newer_format_with_idle_nodes() -> None:
    view = parse_ray_status(status("head_only"))
    assert (view.nodes, view.gpus, view.accelerators) == (1, 8.0, ("H100",))


def test_parse_mixed_and_empty() -> None:
    assert parse_ray_status(status("mixed")).accelerators == ("A100", "H100")
    assert parse_ray_status("") == ClusterView()


def test_head_waits_for_gpus_not_nodes() -> None:
    t = FakeTime()
    runner = Script(
        CommandResult(1, "", "ConnectionError: Could not find any running Ray instance."),
        CommandResult(0, status("head_only")),
        CommandResult(0, status("head_only")),
        CommandResult(0, status("two_nodes")),
    )
    view = wait_for_gpus(16, timeout=60, runner=runner, sleep=t.sleep, clock=t.clock)
    assert view.gpus == 16
    assert len(runner.calls) == 4
    assert runner.calls[0] == ["ray", "status"]
    assert t.sleeps == [2.0, 2.0, 2.0]


def test_head_timeout_names_what_it_saw() -> None:
    t = FakeTime()
    runner = Script(CommandResult(0, status("head_only")))
    with pytest.raises(ModelcacheError) as e:
        wait_for_gpus(16, timeout=20, runner=runner, sleep=t.sleep, clock=t.clock)
    message = str(e.value)
    assert "waited 20 s for Ray to report 16 GPUs; it saw 1 node and 8 GPUs (H100)" in message
    assert "node_4b5f2a0c" in message
    assert "\n" not in message
    assert t.now >= 20


def test_head_timeout_names_the_last_error() -> None:
    t = FakeTime()
    runner = Script(CommandResult(1, "", "line one\nConnectionError: no Ray"))
    with pytest.raises(
        ModelcacheError, match="it saw 0 nodes and 0 GPUs; last `ray status` error: ConnectionError"
    ):
        wait_for_gpus(8, timeout=5, runner=runner, sleep=t.sleep, clock=t.clock)


def test_head_refuses_mixed_gpu_models() -> None:
    t = FakeTime()
    with pytest.raises(InvalidInput, match="different models \\(A100, H100\\)"):
        wait_for_gpus(
            16, timeout=60, runner=Script(CommandResult(0, status("mixed"))), sleep=t.sleep, clock=t.clock
        )


def test_worker_waits_for_head_with_backoff() -> None:
    t = FakeTime()
    down = CommandResult(1, "", "Ray cluster is not found")
    runner = Script(down, down, down, down, down, down, CommandResult(0))
    tries = wait_for_head("head:6379", timeout=300, runner=runner, sleep=t.sleep, clock=t.clock)
    assert tries == 7
    assert runner.calls[0] == ["ray", "health-check", "--address=head:6379"]
    assert t.sleeps == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_worker_timeout() -> None:
    t = FakeTime()
    runner = Script(CommandResult(1, "", "Ray cluster is not found"))
    with pytest.raises(ModelcacheError) as e:
        wait_for_head("head:6379", timeout=30, runner=runner, sleep=t.sleep, clock=t.clock)
    assert "the Ray head at head:6379 did not answer in 30 s" in str(e.value)
    assert "last: Ray cluster is not found" in str(e.value)
    assert t.now <= 31


def test_commands() -> None:
    assert head_start_command("10.0.0.5", 8) == [
        "ray",
        "start",
        "--head",
        "--port=6379",
        "--num-gpus=8",
        "--disable-usage-stats",
        "--node-ip-address=10.0.0.5",
    ]
    assert worker_start_command("head:6379", None, 8) == [
        "ray",
        "start",
        "--address=head:6379",
        "--num-gpus=8",
        "--block",
        "--disable-usage-stats",
    ]
    assert head_address("llama-head") == "llama-head:6379"
    assert head_address("llama-head.ns.svc:7000") == "llama-head.ns.svc:7000"
    with pytest.raises(InvalidInput, match="HEAD_SVC is not set"):
        head_address(None)
