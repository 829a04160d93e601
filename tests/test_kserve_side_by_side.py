"""Our controller on a cluster where KServe v0.20's own CRDs are installed (issue 16 §2): the API
server prunes every field KServe's schemas do not name, and KServe's LocalModelNodeGroup has no
status subresource. The Kubernetes API emulator in CRD mode (tests/support/kubeapi.py) serves
KServe's CRDs as they are (tests/data/kserve-crds/), and a real ``modelcache controller`` process
runs against it with one cache, one node group and one node; once the node lists the cache, every
write request is counted over a window of several resyncs. Converged, nothing should be written:
a write that cannot stick (a pruned field, a ``/status`` that does not exist) repeats forever, and
so does an Event derived from it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from localmodel.kinds import NODE
from tests.support.agents import eventually
from tests.support.kubeapi import KubeAPI, load_crds
from tests.test_api_faults import controller, models_on
from tests.test_controller_reconcile import cache, group, node

KSERVE_CRDS = Path(__file__).parent / "data" / "kserve-crds"
RESYNC = 2.0  # the controller's full reconcile period here (seconds)
SETTLE = 6.0  # after the node first lists the cache, before counting
WINDOW = 20.0  # seconds counted: about ten resyncs


async def test_no_write_repeats_once_converged_under_kserves_crds(tmp_path: Path) -> None:
    api = KubeAPI(crds=load_crds(KSERVE_CRDS))
    await api.start()
    try:
        await api.create(group("g", "100Gi"))  # as `kubectl apply` stores them: pruned
        await api.create(cache("m", "1Gi", ["g"]))
        await api.store.create(NODE, node("n1", "g"))
        args = ("--no-leader-elect", "--metrics-addr", "off", "--resync", str(RESYNC))
        async with controller(api, tmp_path, *args):
            await eventually(lambda: models_on(api, "n1"), timeout=60, what="n1 to list m")
            assert await models_on(api, "n1") == ["m"]
            await asyncio.sleep(SETTLE)
            since = time.monotonic()
            await asyncio.sleep(WINDOW)
            counted = api.write_counts(since=since)
            stuck = api.write_counts(since=since, changed=False)
            refused = [w for w in api.writes if w.at >= since and w.code >= 400]
            admitted = await api.events(reason="Admitted")
    finally:
        await api.close()
    print(f"\nwrites in {WINDOW:.0f} s once converged: {sum(counted.values())}")
    for key, n in sorted(counted.items()):
        print(f"  {n:4d} {' '.join(key)} (stored nothing: {stuck.get(key, 0)})")
    print(f"  refused: {len(refused)}; Admitted Events: {len(admitted)}")
    assert not counted, f"writes repeat once converged: {dict(counted)}"
    # One Event object per reason and object, as Kubernetes keeps them (a repeat moves its count).
    assert len({e["involvedObject"]["name"] for e in admitted}) == len(admitted)
