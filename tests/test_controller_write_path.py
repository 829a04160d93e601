"""The controller's cheaper write path (issue 21 §5): what it takes into its view without parsing,
and the embedded store's handover, must equal what a read of the store gives."""

from __future__ import annotations

from bench.controller_reconcile import loaded
from controller.reconcile import Controller, Settings
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, NODE
from localmodel.resources import LocalModelCache
from localmodel.state.memory import MemoryState


async def test_the_view_after_a_full_reconcile_equals_the_store() -> None:
    state = await loaded(60, 3, 12)
    controller = Controller(state, Settings(max_concurrent_downloads=0))
    await controller.load()
    result = await controller.reconcile(full=True)
    assert result.statuses  # status writes happened, through the unparsed path
    stored = {
        o["metadata"]["name"]: LocalModelCache.from_json(o)
        for o in (await state.list(LOCAL_MODEL_CACHE)).items
    }
    assert controller.view.caches == stored
    # A second pass over the same view writes nothing: the view was right.
    again = await controller.reconcile(full=True)
    assert not again.statuses and not again.nodes


async def test_handover_keeps_no_reference_the_caller_can_reach() -> None:
    state = MemoryState()
    body = {"metadata": {"name": "n1", "labels": {"a": "1"}}, "spec": {"localModels": [{"modelName": "m"}]}}
    answer = await state.create(LOCAL_MODEL_NODE, body, handover=True)
    assert set(answer) == {"metadata"} and answer["metadata"]["resourceVersion"]
    answer["metadata"]["labels"]["a"] = "changed"  # the answer is the caller's own copy
    got = await state.get(LOCAL_MODEL_NODE, "n1")
    assert got["metadata"]["labels"] == {"a": "1"}
    got["spec"]["localModels"][0]["modelName"] = "x"  # reads are copies too
    assert (await state.get(LOCAL_MODEL_NODE, "n1"))["spec"]["localModels"][0]["modelName"] == "m"
    # Without handover the whole object comes back, as an API server answers.
    full = await state.create(NODE, {"metadata": {"name": "w"}, "spec": {}})
    assert full["kind"] == "Node" and "spec" in full
