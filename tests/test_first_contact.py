"""First contact with the agent and status commands: configurations that can never settle, taken
ports, and the messages a first user reads."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

GROUP = """apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelNodeGroup
metadata: {{name: g1}}
spec:
  storageLimit: 1Gi
  persistentVolumeSpec:
    accessModes: [ReadWriteOnce]
    capacity: {{storage: 1Gi}}
    hostPath: {{path: {path}}}
    nodeAffinity:
      required:
        nodeSelectorTerms:
        - matchExpressions:
          - {{key: kubernetes.io/hostname, operator: In, values: [box]}}
  persistentVolumeClaimSpec:
    accessModes: [ReadWriteOnce]
    resources: {{requests: {{storage: 1Gi}}}}
---
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelCache
metadata: {{name: a}}
spec:
  sourceModelUri: file://{src}
  modelSize: 1Mi
  nodeGroups: [g1]
"""


def agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache", "agent", "--node-name", "box",
         "--node-labels", "kubernetes.io/hostname=box", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_once_with_a_cache_folder_unlike_the_groups_exits_2_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 10)
    docs = tmp_path / "models.yaml"
    docs.write_text(GROUP.format(path=tmp_path / "other", src=src))
    quiet = ("--once", "--log-level", "WARNING")
    r = agent("--cache-dir", str(tmp_path / "cache"), "--standalone", str(docs),
              "--health-addr", "off", "--metrics-addr", "off", *quiet)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("modelcache agent: LocalModelNodeGroup g1: spec.persistentVolumeSpec:")
    assert f"--cache-dir {tmp_path / 'other'}" in lines[0]


def test_empty_cache_dir_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "modelcache", "agent", "--node-name", "box", "--cache-dir", "",
         "--standalone", str(tmp_path / "x.yaml"), "--once"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("modelcache agent: --cache-dir: empty;"), r.stderr
    assert list(tmp_path.iterdir()) == []  # the working folder was not made a cache


def test_a_taken_health_or_metrics_port_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    docs = tmp_path / "models.yaml"
    docs.write_text(GROUP.format(path=tmp_path / "cache", src=tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, other in (("--health-addr", "--metrics-addr"), ("--metrics-addr", "--health-addr")):
            quiet = ("--once", "--log-level", "WARNING")
            r = agent("--cache-dir", str(tmp_path / "cache"), "--standalone", str(docs),
                      flag, f"127.0.0.1:{port}", other, "off", *quiet)  # fmt: skip
            assert r.returncode == 2, r.stderr
            line = f"modelcache agent: {flag}: cannot listen on 127.0.0.1:{port}: "
            assert r.stderr.startswith(line), r.stderr
            assert r.stderr.count("\n") == 1, r.stderr


def test_status_names_the_groups_limit_when_every_cache_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 10)
    docs = tmp_path / "models.yaml"
    docs.write_text(
        GROUP.format(path=tmp_path / "cache", src=src).replace("modelSize: 1Mi", "modelSize: 2Gi")
    )
    r = agent("--cache-dir", str(tmp_path / "cache"), "--standalone", str(docs),
              "--health-addr", "off", "--metrics-addr", "off",
              "--once", "--status-interval", "0.1")  # fmt: skip
    assert r.returncode == 1, r.stderr
    s = subprocess.run(
        [sys.executable, "-m", "modelcache", "status", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert s.returncode == 0, s.stderr
    head = s.stdout.splitlines()[0]
    assert "used of 1 GiB" in head or "used of 1.0 GiB" in head, s.stdout
    assert "no limit" not in head
