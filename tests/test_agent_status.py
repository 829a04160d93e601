"""The agent's pure status and record decisions (agent/status.py, agent/records.py): the status body
from what the loop knows, the merge patch, and each state transition of a record."""

from __future__ import annotations

from pathlib import Path

from agent import records
from agent.desired import Desired, desired
from agent.status import CacheFindings, node_limit, node_status, status_patch, summary
from localmodel.layout import storage_key
from localmodel.placement import Refusal
from localmodel.resources import LocalModelNode, LocalModelNodeGroup, ModelProgress, ModelState
from tests.support.agents import group_doc, node_doc

GiB = 1 << 30


def _setup() -> tuple[Desired, dict[str, LocalModelNodeGroup]]:
    node = LocalModelNode.from_json(
        node_doc("n", [("a", "hf://o/m", "1Gi"), ("a2", "hf://o/m", "1Gi"), ("b", "s3://b/x", None)])
    )
    groups = {
        "g": LocalModelNodeGroup.from_json(group_doc("g", limit="10Gi", path=Path("/c"))),
        "h": LocalModelNodeGroup.from_json(group_doc("h", limit="5Gi", path=Path("/c"))),
    }
    return desired(node, groups, cache_dir=Path("/c")), groups


def test_aliases_share_one_progress_and_a_key_without_record_is_pending() -> None:
    d, _ = _setup()
    key = storage_key("hf://o/m")
    done = records.published(records.new_record(key, "hf://o/m").progress, size=GiB, files=3, revision="abc")
    status = node_status(
        desired=d,
        progress={key: done},
        refused=(),
        limit=10 * GiB,
        used=GiB,
        found=CacheFindings(),
        config_problem=None,
        generation=4,
    )
    assert status.model_status == {
        "a": ModelState.DOWNLOADED,
        "a2": ModelState.DOWNLOADED,
        "b": ModelState.PENDING,
    }
    assert status.models["a"] is status.models["a2"] is done
    assert status.models["b"] == ModelProgress(ModelState.PENDING, storage_key("s3://b/x"))
    assert status.summary == "2/3 downloaded"
    assert status.capacity.available is not None and status.capacity.available.bytes == 9 * GiB
    assert status.observed_generation == 4
    assert [(c.type, c.status) for c in status.conditions] == [
        ("CacheFolderClean", "True"),
        ("ConfigurationValid", "True"),
    ]


def test_refused_caches_show_as_errors_and_their_groups_count_in_the_limit() -> None:
    d, groups = _setup()
    refused = (Refusal("big", "h", "InsufficientStorage", "needs 9Gi", "hf://o/big"),)
    assert node_limit(d, groups, ()) == 10 * GiB
    assert node_limit(d, groups, refused) == 15 * GiB
    status = node_status(
        desired=d,
        progress={},
        refused=refused,
        limit=15 * GiB,
        used=0,
        found=CacheFindings(links=frozenset({"x"}), foreign=frozenset({"k1"}), kept={"k2": "models/k2 kept"}),
        config_problem="bad group",
        generation=None,
    )
    big = status.models["big"]
    assert (big.state, big.reason, big.storage_key) == (
        ModelState.ERROR,
        "InsufficientStorage",
        storage_key("hf://o/big"),
    )
    assert status.summary == "0/4 downloaded, 1 failed or refused"
    clean, config = status.conditions
    assert clean.message == (
        "symbolic links not followed: x; folders without a manifest of modelcache, never deleted: "
        "models/k1; models/k2 kept"
    )
    assert (config.status, config.reason, config.message) == ("False", "InvalidConfiguration", "bad group")


def test_summary_counts_names() -> None:
    states = {"a": ModelState.DOWNLOADED, "b": ModelState.DOWNLOADING, "c": ModelState.ERROR}
    assert summary(states) == "1/3 downloaded, 1 downloading, 1 failed or refused"
    assert summary({}) == "0/0 downloaded"


def test_the_patch_keeps_conditions_the_agent_does_not_write() -> None:
    theirs = {"type": "SpecContested", "status": "True"}
    ours = {"summary": "1/1 downloaded", "conditions": [{"type": "CacheFolderClean", "status": "True"}]}
    patch = status_patch({"status": {"conditions": [theirs]}}, ours)
    assert patch is not None and patch["conditions"] == [*ours["conditions"], theirs]
    assert status_patch({"status": {**ours, "conditions": [*ours["conditions"], theirs]}}, ours) is None


def test_a_download_starts_clean_and_completes_with_its_counts() -> None:
    rec = records.new_record("k", "hf://o/m")
    failed = records.failed(rec.progress, "TransientError", "boom", retry_after="2026-01-01T00:00:00Z")
    started = records.started(failed, now="2026-01-01T00:05:00Z")
    assert (started.state, started.reason, started.message, started.retry_after) == (
        ModelState.DOWNLOADING,
        None,
        None,
        None,
    )
    assert started.start_time == "2026-01-01T00:05:00Z" and started.completion_time is None
    grown = records.advanced(
        records.sized(records.listed(started, revision="r"), total=100, done=10, files=2), 30
    )
    assert grown.revision == "r"
    assert (grown.bytes_done, grown.bytes_total, grown.files_total) == (40, 100, 2)
    done = records.completed(grown, size=100, files=2, revision="r", checked=(1, 1), now="later")
    assert (done.state, done.bytes_done, done.files_done, done.files_verified, done.files_size_only) == (
        ModelState.DOWNLOADED,
        100,
        2,
        1,
        1,
    )
    # An up-to-date result checked nothing: the last counts stand.
    again = records.completed(done, size=100, files=2, revision="r", checked=None, now="later still")
    assert (again.files_verified, again.files_size_only, again.completion_time) == (1, 1, "later still")


def test_queued_forgets_only_refusals_for_room_and_interrupted_only_downloads() -> None:
    p = records.new_record("k", "u").progress
    room = records.queued(records.failed(p, "InsufficientStorage", "needs 1Gi"))
    assert (room.state, room.reason, room.message) == (ModelState.PENDING, None, None)
    other = records.queued(records.failed(p, "AccessDenied", "403"))
    assert (other.state, other.reason) == (ModelState.PENDING, "AccessDenied")
    assert records.interrupted(records.started(p, now="t")).state is ModelState.PENDING
    errored = records.failed(p, "AccessDenied", "403")
    assert records.interrupted(errored) is errored


def test_a_warning_is_shown_only_without_a_message() -> None:
    rec = records.new_record("k", "u")
    rec.warning = "bigger than declared"
    assert rec.shown().message == "bigger than declared"
    rec.progress = records.failed(rec.progress, "SizeExceedsDeclared", "refused")
    assert rec.shown().message == "refused"
