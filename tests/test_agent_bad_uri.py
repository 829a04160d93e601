"""One bad sourceModelUri in a cluster-mode LocalModelNode fails that model only (13 §5)."""

import json
from pathlib import Path

from localmodel.kinds import KINDS_BY_NAME, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from tests.support.agents import group_doc, node_doc
from tests.support.kubeapi import KubeAPI
from tests.test_agent_hardening import run_cluster_agent


async def test_a_bad_uri_fails_its_model_and_the_others_are_downloaded(
    kube_api: KubeAPI, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "m").mkdir(parents=True)
    (allowed / "m" / "w.bin").write_bytes(b"weights")
    good = f"file://{allowed / 'm'}"
    bad = {
        "dotdot": f"file://{allowed}/../outside/m",
        "relative": "outside/m",
        "encoded": f"file://{allowed}/%2e%2e/outside/m",
    }
    cache = tmp_path / "cache"
    models = [("good", good, "1Mi"), *((n, u, "1Mi") for n, u in bad.items())]
    for obj in (group_doc("g", path=cache), node_doc("n1", models)):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)

    # 1: not every model is downloaded (never 2, the exit of a bad command line: a crash loop).
    assert await run_cluster_agent(tmp_path, kube_api, "--allow-file-sources", str(allowed)) == 1
    n1 = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert n1["status"]["modelStatus"] == {"good": "ModelDownloaded"} | {n: "ModelDownloadError" for n in bad}
    state = json.loads((cache / ".modelcache" / "state.json").read_text())["status"]["models"]
    for name in bad:
        assert state[name]["reason"] == "InvalidSourceURI"
        assert "sourceModelUri" in state[name]["message"] and "\n" not in state[name]["message"]
    assert (cache / "models" / storage_key(good) / "w.bin").read_bytes() == b"weights"
    # How its one file was checked (13 §13): a folder offers no hash, so by size alone.
    assert (state["good"]["filesVerified"], state["good"]["filesSizeOnly"]) == (0, 1)
