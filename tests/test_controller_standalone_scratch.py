"""A scratch folder (/tmp) holds a group's cache in the controller's standalone mode, as in the
agent's (the user's own machine); in a cluster it is refused (the CRD, the webhooks, the controller)."""

from __future__ import annotations

import pytest

from localmodel.errors import SpecError
from localmodel.resources import cluster_group
from tests.test_controller_reconcile import group as group_doc


def test_tmp_is_a_cache_folder_only_outside_a_cluster() -> None:
    doc = group_doc("g", "1Gi")
    doc["spec"]["persistentVolumeSpec"]["hostPath"] = {"path": "/tmp/modelcache/cache"}
    assert cluster_group(doc, cluster=False).spec.cache_path == "/tmp/modelcache/cache"
    with pytest.raises(SpecError, match="system folder"):
        cluster_group(doc)
