"""A cache the placement refuses for this node (no room in its group, a group that does not exist) is
shown wherever the status goes, with both numbers, logged once; ``--once`` then exits 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import status_cli
from agent.standalone import StandaloneSource
from localmodel.kinds import EVENT
from localmodel.placement import INSUFFICIENT_STORAGE, NODE_GROUP_NOT_FOUND
from localmodel.state.memory import MemoryState
from tests.support.agents import Running, cache_doc, eventually, group_doc, running_agent
from tests.support.hfhub import Hub

TOO_BIG = "needs 5Gi, group h100 has 1Gi of 1Gi free"
TYPO = "node group 'h10O' does not exist; create it or remove it from spec.nodeGroups"


def documents(tmp_path: Path, cache: Path) -> Path:
    docs = tmp_path / "models.yaml"
    docs.write_text(
        yaml.safe_dump_all(
            [
                group_doc("h100", limit="1Gi", path=cache),
                cache_doc("big", "hf://org/big", "5Gi", ["h100"]),
                cache_doc("typo", "hf://org/typo", "1Mi", ["h10O"]),
            ]
        )
    )
    return docs


@contextlib.asynccontextmanager
async def standalone(docs: Path, cache: Path) -> AsyncIterator[Running]:
    state = MemoryState()
    source = StandaloneSource(docs, node_name="box", labels={"gpu": "h100"}, state=state, interval=0.1)
    assert await source.load()
    poller = asyncio.create_task(source.run())
    try:
        async with running_agent(
            state,
            cache,
            store=state,
            node="box",
            source_error=lambda: source.error,
            refused=lambda: source.refused,
        ) as run:
            yield run
    finally:
        poller.cancel()


def check_models(models: dict[str, Any]) -> None:
    big, typo = models["big"], models["typo"]
    assert (big["state"], big["reason"], big["message"]) == (
        "ModelDownloadError",
        INSUFFICIENT_STORAGE,
        TOO_BIG,
    )
    assert big["sourceModelUri"] == "hf://org/big" and big["storageKey"]
    assert (typo["state"], typo["reason"], typo["message"]) == (
        "ModelDownloadError",
        NODE_GROUP_NOT_FOUND,
        TYPO,
    )


async def test_refused_caches_are_shown_everywhere_and_logged_once(
    hf_hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="modelcache.agent")
    cache = tmp_path / "cache"
    docs = documents(tmp_path, cache)
    async with standalone(
        docs,
        cache,
    ) as run:

        async def shown() -> bool:
            return "big" in ((await run.status()).get("modelStatus") or {})

        await eventually(shown, what="the refusals in the LocalModelNode status")
        for _ in range(3):  # more reconciles: nothing is said again
            run.agent.wake.set()
            await asyncio.sleep(0.2)
        status = await run.status()
        assert status["modelStatus"] == {"big": "ModelDownloadError", "typo": "ModelDownloadError"}
        assert status["summary"] == "0/2 downloaded, 2 failed or refused"
        check_models(status["models"])
        check_models(run.agent.snapshot()["status"]["models"])  # GET /status
        events = (await run.store.list(EVENT)).items if run.store else []
        refused = sorted(e["message"] for e in events if e["reason"] == "Refused")
        assert refused == [
            f"big: not placed on this node ({INSUFFICIENT_STORAGE}): {TOO_BIG}",
            f"typo: not placed on this node ({NODE_GROUP_NOT_FOUND}): {TYPO}",
        ]
        said = [r.getMessage() for r in caplog.records if "not placed on this node" in r.getMessage()]
        assert len(said) == 2, said
        assert run.agent.all_downloaded() is False
    assert hf_hub.count("GET", "org/big") == 0

    # The state file, through ``modelcache status``: json and table.
    assert status_cli.main(["--cache-dir", str(cache), "--output", "json"]) == 0
    check_models(json.loads(capsys.readouterr().out)["status"]["models"])
    assert status_cli.main(["--cache-dir", str(cache)]) == 0
    table = capsys.readouterr().out
    assert f"{INSUFFICIENT_STORAGE}: {TOO_BIG}" in table
    assert f"{NODE_GROUP_NOT_FOUND}: {TYPO}" in table


async def test_a_refusal_clears_when_the_documents_make_room(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/big", {"config.json": b"{}"})
    cache = tmp_path / "cache"
    docs = tmp_path / "models.yaml"
    docs.write_text(
        yaml.safe_dump_all(
            [group_doc("h100", limit="1Gi", path=cache), cache_doc("big", "hf://org/big", "5Gi", ["h100"])]
        )
    )
    async with standalone(docs, cache) as run:

        async def refused() -> bool:
            return (await run.status()).get("modelStatus") == {"big": "ModelDownloadError"}

        await eventually(refused, what="refused")
        docs.write_text(
            yaml.safe_dump_all(
                [
                    group_doc("h100", limit="10Gi", path=cache),
                    cache_doc("big", "hf://org/big", "5Gi", ["h100"]),
                ]
            )
        )

        async def fetched() -> bool:
            return (await run.status()).get("modelStatus") == {"big": "ModelDownloaded"}

        await eventually(fetched, what="fetched once there is room")
        assert run.agent.all_downloaded() is True


def test_once_with_a_refused_cache_exits_1(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    docs = tmp_path / "models.yaml"
    docs.write_text(
        yaml.safe_dump_all(
            [group_doc("h100", limit="1Gi", path=cache), cache_doc("big", "hf://org/big", "5Gi", ["h100"])]
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "modelcache", "agent", "--node-name", "box", "--node-labels", "gpu=h100",
         "--cache-dir", str(cache), "--standalone", str(docs),
         "--health-addr", "off", "--metrics-addr", "off", "--once"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.count(TOO_BIG) == 1, r.stderr
    state = json.loads((cache / ".modelcache" / "state.json").read_text())
    assert state["status"]["models"]["big"]["message"] == TOO_BIG


def test_place_node_tells_a_node_what_it_was_refused() -> None:
    from localmodel.placement import place_node
    from localmodel.resources import LocalModelCache, LocalModelNodeGroup, Node

    groups = [LocalModelNodeGroup.from_json(group_doc(g, limit="1Gi")) for g in ("a100", "h100")]
    caches = [
        LocalModelCache.from_json(cache_doc("big", "hf://org/big", "5Gi", ["h100"])),
        LocalModelCache.from_json(cache_doc("both", "hf://org/both", "1Gi", ["a100", "nope"])),
        LocalModelCache.from_json(cache_doc("typo", "hf://org/typo", "1Mi", ["h10O"])),
    ]
    h100 = place_node(Node("n", {"gpu": "h100"}), caches, groups)
    assert [(r.cache, r.reason, r.source_model_uri) for r in h100.refused] == [
        ("big", INSUFFICIENT_STORAGE, "hf://org/big"),
        ("both", NODE_GROUP_NOT_FOUND, "hf://org/both"),
        ("typo", NODE_GROUP_NOT_FOUND, "hf://org/typo"),
    ]
    # An a100 node holds "both" (its typo'd second group is no refusal there) and was never
    # offered "big" (not its group's cache).
    a100 = place_node(Node("n", {"gpu": "a100"}), caches, groups)
    assert [m.model_name for m in a100.models] == ["both"]
    assert [(r.cache, r.reason) for r in a100.refused] == [("typo", NODE_GROUP_NOT_FOUND)]
