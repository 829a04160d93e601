"""``modelcache controller --admission enforce|warn`` (issue 16 §1). KServe never enforced
``storageLimit`` (no KServe v0.20 code reads it: pkg/apis/serving/v1alpha1/localmodelnodegroup_types.go
declares it, nothing in pkg/controller/v1alpha1/localmodel* uses it), so a migrated cluster may be
over-subscribed: in warn mode a cache refused for capacity alone is placed anyway, with a Warning
Event and a StorageOvercommitted condition; a refusal of any other kind stands. On both backends
(the embedded state of ``--standalone`` and the Kubernetes API emulator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import cli as agent_cli
from agent.desired import standalone_placement
from agent.planner import Disk, Want, plan
from controller import cli
from controller.admission import validate_cache
from controller.reconcile import Controller, Settings
from controller.status import OVERCOMMITTED, STORAGE_OVERCOMMITTED
from localmodel.kinds import EVENT, LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE_GROUP
from localmodel.resources import LocalModelCache, LocalModelNodeGroup
from localmodel.state.base import ClusterState
from modelcache.cli import main as modelcache_main
from tests.test_controller_reconcile import cache, group, models_on, setup_two_groups, state, write_docs

__all__ = ["state"]  # the fixture: both backends

NEED = "needs 140Gi, group h100 has 40Gi of 100Gi free"


async def _events(state: ClusterState, name: str) -> list[dict[str, Any]]:
    items = (await state.list(EVENT, namespace="default")).items
    return [e for e in items if e["involvedObject"]["name"] == name]


def _conditions(obj: dict[str, Any], ctype: str) -> dict[str | None, dict[str, Any]]:
    return {c.get("nodeGroup"): c for c in obj["status"].get("conditions") or [] if c["type"] == ctype}


async def _two_caches(state: ClusterState) -> None:
    await setup_two_groups(state)  # a100: 500Gi (a1, a2); h100: 100Gi (h1)
    # Created in the same second: weighed by name, "fits" first.
    await state.create(LOCAL_MODEL_CACHE, cache("fits", "60Gi", ["a100", "h100"]))
    await state.create(LOCAL_MODEL_CACHE, cache("over", "140Gi", ["a100", "h100"]))


async def test_enforce_refuses_an_storedlimit_cache(state: ClusterState) -> None:
    await _two_caches(state)
    await Controller(state, Settings()).run(once=True)
    assert await models_on(state, "h1") == ["fits"]
    stored = await state.get(LOCAL_MODEL_CACHE, "over")
    refused = _conditions(stored, "Admitted")["h100"]
    assert (refused["status"], refused["reason"], refused["message"]) == (
        "False",
        "InsufficientStorage",
        NEED,
    )
    assert not _conditions(stored, STORAGE_OVERCOMMITTED)
    assert not [e for e in await _events(state, "over") if e["reason"] == OVERCOMMITTED]


async def test_warn_places_it_with_a_warning_event_and_a_condition(state: ClusterState) -> None:
    await _two_caches(state)
    await Controller(state, Settings(overcommit=True)).run(once=True)
    assert await models_on(state, "h1") == ["fits", "over"]
    assert await models_on(state, "a1") == ["fits", "over"]
    stored = await state.get(LOCAL_MODEL_CACHE, "over")
    admitted = _conditions(stored, "Admitted")
    assert {g: c["status"] for g, c in admitted.items()} == {"a100": "True", "h100": "True"}
    assert admitted["h100"]["message"] == "admitted to node group h100: 200Gi of 100Gi per node in use"
    (over,) = _conditions(stored, STORAGE_OVERCOMMITTED).values()
    message = (
        f"admitted over the storageLimit of node group h100 (--admission warn): {NEED}; "
        "its nodes may run out of disk"
    )
    assert (over["nodeGroup"], over["status"], over["reason"], over["message"]) == (
        "h100",
        "True",
        OVERCOMMITTED,
        message,
    )
    assert stored["status"]["nodeStatus"] == {n: "NodeDownloadPending" for n in ("a1", "a2", "h1")}
    fits = await state.get(LOCAL_MODEL_CACHE, "fits")
    assert not _conditions(fits, STORAGE_OVERCOMMITTED), "the cache that fits is not flagged"
    h100 = await state.get(LOCAL_MODEL_NODE_GROUP, "h100")
    assert (h100["status"]["used"], h100["status"]["available"]) == ("200Gi", "0")
    warned = [e for e in await _events(state, "over") if e["reason"] == OVERCOMMITTED]
    assert [(e["type"], e["message"]) for e in warned] == [("Warning", message)]

    # Converged: another pass neither rewrites the condition nor repeats the Event.
    version = stored["metadata"]["resourceVersion"]
    await Controller(state, Settings(overcommit=True)).run(once=True)
    assert (await state.get(LOCAL_MODEL_CACHE, "over"))["metadata"]["resourceVersion"] == version
    again = [e for e in await _events(state, "over") if e["reason"] == OVERCOMMITTED]
    assert [e.get("count", 1) for e in again] == [1]

    # Back to enforce: the cache is refused there again and the condition goes.
    await Controller(state, Settings()).run(once=True)
    assert await models_on(state, "h1") == ["fits"]
    stored = await state.get(LOCAL_MODEL_CACHE, "over")
    assert not _conditions(stored, STORAGE_OVERCOMMITTED)
    assert _conditions(stored, "Admitted")["h100"]["reason"] == "InsufficientStorage"


async def test_warn_keeps_refusing_what_is_not_capacity(state: ClusterState) -> None:
    """A group that does not exist is no capacity question: refused in warn mode too."""
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("lost", "1Gi", ["a100", "gone"]))
    await Controller(state, Settings(overcommit=True)).run(once=True)
    lost = await state.get(LOCAL_MODEL_CACHE, "lost")
    assert _conditions(lost, "Admitted")["gone"]["reason"] == "NodeGroupNotFound"
    assert not _conditions(lost, STORAGE_OVERCOMMITTED)


def test_the_cache_webhook_warns_instead_of_refusing() -> None:
    groups = [LocalModelNodeGroup.from_json(group("h100", "100Gi"))]
    fits = LocalModelCache.from_json(cache("fits", "60Gi", ["h100"]))
    big = cache("over", "140Gi", ["h100"])
    enforce = validate_cache("CREATE", big, None, caches=[fits], groups=groups)
    assert not enforce.allowed
    assert enforce.message == "no listed node group can admit it: " + NEED
    warn = validate_cache("CREATE", big, None, caches=[fits], groups=groups, overcommit=True)
    assert warn.allowed
    assert warn.warnings == (f"admitted over the storageLimit (--admission warn): {NEED}",)
    missing = cache("lost", "1Gi", ["gone"])
    assert not validate_cache("CREATE", missing, None, caches=[], groups=groups, overcommit=True).allowed
    # A LocalModelNamespaceCache is told apart by its key (<namespace>/<name>): warned the same way.
    meta = {**big["metadata"], "namespace": "team-a"}
    ns_big = {**big, "kind": "LocalModelNamespaceCache", "metadata": meta}
    warn = validate_cache("CREATE", ns_big, None, caches=[fits], groups=groups, overcommit=True)
    assert warn.allowed
    assert warn.warnings == (f"admitted over the storageLimit (--admission warn): {NEED}",)


def test_cli_flag_standalone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--admission warn`` on the embedded backend (``--standalone``): the dry run shows the cache
    placed on h100's node with the condition; enforce (the default) refuses it; anything else is
    bad usage (exit 2)."""
    write_docs(tmp_path / "docs")  # big: 140Gi on a100 (500Gi) and h100 (100Gi)
    args = ["controller", "--standalone", str(tmp_path / "docs"), "--once", "--output", "json"]
    for mode, on_h1 in (([], []), (["--admission", "enforce"], []), (["--admission=warn"], ["big"])):
        assert modelcache_main([*args, *mode]) == 0
        objs = {(o["kind"], o["metadata"]["name"]): o for o in json.loads(capsys.readouterr().out)}
        assert [m["modelName"] for m in objs[("LocalModelNode", "h1")]["spec"]["localModels"]] == on_h1
        flagged = _conditions(objs[("LocalModelCache", "big")], STORAGE_OVERCOMMITTED)
        assert list(flagged) == (["h100"] if on_h1 else [])
    assert modelcache_main([*args, "--admission", "lenient"]) == 2
    assert "--admission" in capsys.readouterr().err
    parsed = cli._parser().parse_args(["--admission", "warn"])
    settings = cli.ControllerSettings.from_args(parsed, {})
    assert (settings.admission, settings.reconcile().overcommit) == ("warn", True)
    assert cli.ControllerSettings.from_args(cli._parser().parse_args([]), {}).reconcile().overcommit is False


def test_the_agent_fetches_over_the_limit_in_warn_mode_while_the_disk_has_room() -> None:
    """The controller places a cache over its group's storageLimit in warn mode; the node's agent
    run with --admission warn fetches it (with a warning) instead of refusing it against the same
    limit. Room on the filesystem is physical: refused in both modes."""
    wants = (Want("fits", "k1", 60 << 30), Want("over", "k2", 140 << 30))
    disk = Disk(published={}, free=1 << 40)
    enforce = plan(wants, disk, limit=100 << 30)
    assert enforce.download == ("fits",)
    assert [(r.name, r.reason, r.message) for r in enforce.refuse] == [
        ("over", "InsufficientStorage", "needs 140Gi, 40Gi of the node group's 100Gi limit is available")
    ]
    warn = plan(wants, disk, limit=100 << 30, overcommit=True)
    assert (warn.download, warn.refuse, warn.used, warn.available) == (("fits", "over"), (), 200 << 30, 0)
    assert warn.warnings == {
        "over": "over the node group's limit (--admission warn): needs 140Gi, 40Gi of the node group's "
        "100Gi limit is available; downloaded, as the filesystem has room"
    }
    small_disk = Disk(published={}, free=100 << 30)
    full = plan(wants, small_disk, limit=100 << 30, overcommit=True)
    assert full.download == ("fits",)
    assert [(r.name, r.message) for r in full.refuse] == [
        ("over", "needs 140Gi, 40Gi free on the cache's filesystem is available")
    ]
    parsed = agent_cli.build_parser().parse_args(["--cache-dir", "/c", "--admission", "warn"])
    assert parsed.admission == "warn"


def test_the_standalone_agent_places_as_the_controller_does() -> None:
    """``modelcache agent --standalone --admission warn`` runs the same placement rule."""
    groups = [LocalModelNodeGroup.from_json(group("h100", "100Gi"))]
    caches = [
        LocalModelCache.from_json(cache(n, s, ["h100"])) for n, s in (("fits", "60Gi"), ("over", "140Gi"))
    ]
    args: dict[str, Any] = {"node_name": "h1", "labels": {"gpu": "h100"}, "caches": caches, "groups": groups}
    enforce = standalone_placement(**args)
    assert [m.model_name for m in enforce.models] == ["fits"]
    assert [(r.cache, r.reason) for r in enforce.refused] == [("over", "InsufficientStorage")]
    warn = standalone_placement(**args, overcommit=True)
    assert ([m.model_name for m in warn.models], warn.refused) == (["fits", "over"], ())
