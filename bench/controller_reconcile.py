"""How long the controller takes: a full reconcile of a large cluster, and an incremental one.

    .venv/bin/python bench/controller_reconcile.py [--nodes 5000 --groups 20 --caches 500]

Objects are generated in memory and loaded into the embedded backend; the controller then reads,
plans and writes through the ClusterState interface as it would against an API server. Reported:
CPU seconds of the first full reconcile (read + plan + write every LocalModelNode and status), of a
second full one that has nothing to write, and of an incremental one after one node's agent
reported a model downloaded (targets: full < 10 s, incremental < 50 ms), then how the plan's time
grows with nodes and with caches. In the same run, the plan alone of that first full reconcile
(another controller over the same objects, planning without writing) and the ratio: the writes
must cost less than the plan (target: full reconcile < 2x plan only).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from controller.plan import plan
from controller.reconcile import Controller, Settings
from controller.snapshot import Options, Snapshot
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, LOCAL_MODEL_NODE_GROUP, NODE
from localmodel.placement import layout
from localmodel.resources import LocalModelCache, LocalModelNodeGroup, Node
from localmodel.state.base import WatchEvent
from localmodel.state.memory import MemoryState


def objects(nodes: int, groups: int, caches: int, seed: int = 1) -> dict[str, list[dict[str, Any]]]:
    rnd = random.Random(seed)
    gs: list[dict[str, Any]] = [
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNodeGroup",
            "metadata": {"name": f"g{i:02}"},
            "spec": {
                "storageLimit": "2Ti",
                "persistentVolumeSpec": {
                    "hostPath": {"path": "/models"},
                    "nodeAffinity": {
                        "required": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {"key": "pool", "operator": "In", "values": [f"g{i:02}"]}
                                    ]
                                }
                            ]
                        }
                    },
                },
            },
        }
        for i in range(groups)
    ]
    ns = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": f"node-{i:05}", "labels": {"pool": f"g{i % groups:02}"}},
        }
        for i in range(nodes)
    ]
    cs = [
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": {
                "name": f"model-{i:04}",
                "creationTimestamp": f"2026-01-01T00:{i // 60 % 60:02}:{i % 60:02}Z",
            },
            "spec": {
                "sourceModelUri": f"hf://org/model-{i:04}",
                "modelSize": f"{rnd.choice((8, 16, 40, 80, 140))}Gi",
                "nodeGroups": sorted(
                    rnd.sample([g["metadata"]["name"] for g in gs], k=min(groups, rnd.randint(1, 3)))
                ),
            },
        }
        for i in range(caches)
    ]
    return {"groups": gs, "nodes": ns, "caches": cs}


async def loaded(nodes: int, groups: int, caches: int) -> MemoryState:
    state = MemoryState(history=1000)
    objs = objects(nodes, groups, caches)
    for kind, key in ((LOCAL_MODEL_NODE_GROUP, "groups"), (NODE, "nodes"), (LOCAL_MODEL_CACHE, "caches")):
        for o in objs[key]:
            await state.create(kind, o)
    return state


def cpu() -> float:
    return time.process_time()


async def full_and_incremental(nodes: int, groups: int, caches: int, limit: int) -> None:
    state = await loaded(nodes, groups, caches)
    planner = Controller(state, Settings(max_concurrent_downloads=limit))
    await planner.load()
    t = cpu()
    planned = planner.plan_only(full=True)
    t_plan = cpu() - t
    del planner
    controller = Controller(state, Settings(max_concurrent_downloads=limit))
    t = cpu()
    await controller.load()
    t_load = cpu() - t
    t = cpu()
    first = await controller.reconcile(full=True)
    t_first = cpu() - t
    t = cpu()
    second = await controller.reconcile(full=True)
    t_second = cpu() - t
    entries = sum(len(w.models) for w in first.nodes)
    print(
        f"full reconcile, {nodes} nodes / {groups} groups / {caches} caches (pacing {limit}): "
        f"read {t_load:.2f} s + plan and write {t_first:.2f} s = {t_load + t_first:.2f} s CPU "
        f"({len(first.nodes)} LocalModelNodes, {entries} model entries, {len(first.statuses)} status writes); "
        f"again with nothing to write: {t_second:.2f} s ({len(second.nodes) + len(second.statuses)} writes)"
    )
    assert len(planned.nodes) == len(first.nodes)
    print(
        f"plan only of that first full reconcile, same run: {t_plan:.2f} s CPU; "
        f"full reconcile / plan only = {t_first / t_plan:.2f} (target < 2)"
    )
    # One agent reports one model downloaded: the watch event, then an incremental reconcile.
    lmns = [o for o in (await state.list(LOCAL_MODEL_NODE)).items if o["spec"]["localModels"]]
    samples = []
    for lmn in lmns[:: max(1, len(lmns) // 20)][:20]:
        models = lmn["spec"]["localModels"]
        name = models[0]["modelName"]  # modelStatus is keyed by modelName, as the agents write it
        t0 = time.perf_counter()
        updated = await state.patch_status(
            LOCAL_MODEL_NODE, lmn["metadata"]["name"], {"modelStatus": {name: "ModelDownloaded"}}
        )
        controller.observe(LOCAL_MODEL_NODE, WatchEvent("MODIFIED", updated))
        result = await controller.reconcile()
        samples.append((time.perf_counter() - t0, len(result.nodes), len(result.statuses)))
    samples.sort()
    median, worst = samples[len(samples) // 2], samples[-1]
    print(
        f"incremental (one node's status, {len(samples)} samples): median {median[0] * 1000:.1f} ms, "
        f"worst {worst[0] * 1000:.1f} ms wall (each: the status write, the event, the plan, its writes: "
        f"{median[1]} LocalModelNode and {median[2]} status writes)"
    )


def plan_seconds(nodes: int, groups: int, caches: int) -> float:
    objs = objects(nodes, groups, caches)
    cs = {c.name: c for c in map(LocalModelCache.from_json, objs["caches"])}
    gs = {g.name: g for g in map(LocalModelNodeGroup.from_json, objs["groups"])}
    ns = {n.name: n for n in map(Node.from_json, objs["nodes"])}
    t = cpu()
    placed = layout(cs.values(), gs.values(), ns.values())
    plan(Snapshot(cs, gs, ns), Options(max_concurrent_downloads=0), placed=placed)  # every entry placed
    return cpu() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=5000)
    p.add_argument("--groups", type=int, default=20)
    p.add_argument("--caches", type=int, default=500)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--no-scaling", action="store_true")
    args = p.parse_args()
    asyncio.run(full_and_incremental(args.nodes, args.groups, args.caches, args.limit))
    if args.no_scaling:
        return
    print("plan only (layout + plan, no I/O, no pacing: every node gets its whole spec), CPU seconds:")
    for n in (1250, 2500, 5000, 10000):
        print(
            f"  {n:>6} nodes, {args.groups} groups, {args.caches} caches: {plan_seconds(n, args.groups, args.caches):.2f} s"
        )
    for c in (125, 250, 500, 1000):
        print(
            f"  {args.nodes:>6} nodes, {args.groups} groups, {c:>4} caches: {plan_seconds(args.nodes, args.groups, c):.2f} s"
        )


if __name__ == "__main__":
    main()
