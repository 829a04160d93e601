"""First contact with the agent and status commands: configurations that can never settle, taken
ports, and the messages a first user reads."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from agent.status_cli import state_file_problem

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


def test_standalone_dev_null_says_it_is_not_a_file_of_documents(tmp_path: Path) -> None:
    r = agent("--cache-dir", str(tmp_path / "cache"), "--standalone", "/dev/null", "--once")
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        "modelcache agent: --standalone: /dev/null is not a regular file or a folder; pass a YAML file "
        "or a folder of them\n"
    )


def status(cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache", "status", "--cache-dir", str(cache)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_status_on_a_corrupt_state_file_falls_back_to_the_manifests(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 10)
    docs = tmp_path / "models.yaml"
    docs.write_text(GROUP.format(path=tmp_path / "cache", src=src))
    r = agent("--cache-dir", str(tmp_path / "cache"), "--standalone", str(docs),
              "--health-addr", "off", "--metrics-addr", "off", "--once")  # fmt: skip
    assert r.returncode == 0, r.stderr
    state = tmp_path / "cache" / ".modelcache" / "state.json"
    assert state_file_problem(json.loads(state.read_text())) is None  # what the agent writes is one
    wrong_shapes = {
        '{"version": 1, "status": {"models": {"x": {"bytesDone": "a"}}}}': "status.models.x.state",
        '{"version": 1, "status": {"models": {"x": {"state": "ModelDownloaded", "bytesDone": "a"}}}}': (
            "status.models.x.bytesDone: expected a whole number"
        ),
        '{"version": 1, "status": {"models": [1]}}': "status.models: expected an object",
        '{"x": "y"}': "version: expected 1, got None",
        '{"version": 2, "status": {}}': "version: expected 1, got 2",
        '{"version": 1, "status": {"conditions": [{"status": 3}]}}': "status.conditions[0]",
    }
    for corrupt, problem in {
        '{"node": "box", "stat': "not valid JSON",
        "[1, 2]": "got list",
        **wrong_shapes,
    }.items():
        state.write_text(corrupt)
        s = status(tmp_path / "cache")
        assert s.returncode == 0, s.stderr
        head, row = s.stdout.splitlines()[0:3:2]
        assert f"{state} is " in head and "; models from the manifests" in head
        assert problem in head, head
        assert "ModelDownloaded" in row and "10 B / 10 B" in row


def test_status_refuses_an_empty_cache_dir(tmp_path: Path) -> None:
    # Path("") is the working folder: status must not read it as the cache (the agent refuses too).
    s = subprocess.run(
        [sys.executable, "-m", "modelcache", "status", "--cache-dir", " "],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert s.returncode == 2 and s.stdout == ""
    assert (
        s.stderr
        == "modelcache status: --cache-dir: empty; name the path, e.g. --cache-dir /var/lib/modelcache\n"
    )


def test_a_failure_under_once_says_it_is_not_retried(tmp_path: Path) -> None:
    docs = tmp_path / "models.yaml"
    docs.write_text(GROUP.format(path=tmp_path / "cache", src=tmp_path / "missing"))
    r = agent("--cache-dir", str(tmp_path / "cache"), "--standalone", str(docs),
              "--health-addr", "off", "--metrics-addr", "off", "--once")  # fmt: skip
    assert r.returncode == 1, r.stderr
    failed = [line for line in r.stderr.splitlines() if "download failed" in line or "DownloadFailed" in line]
    assert failed, r.stderr
    assert all("not retried" in line and "retry in" not in line for line in failed), failed


def test_pull_says_1_file_and_reads_50KB_per_second_as_decimal_kilobytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 10)
    r = subprocess.run(
        [sys.executable, "-m", "modelcache", "pull", f"file://{src}", str(tmp_path / "dest"),
         "--max-bandwidth", "50KB/s"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"-> {tmp_path / 'dest'}: 1 file, " in r.stdout
    assert "1 checked by size only (w.bin): the source gives no hash for it" in r.stdout
    from localmodel.errors import InvalidInput
    from localmodel.quantity import parse_rate

    assert parse_rate("50KB/s") == parse_rate("50kB/s") == 50_000
    try:
        parse_rate("50kb/s")
    except InvalidInput as e:
        assert "50kB/s" in str(e) and "Ki, Mi, Gi: of 1024" in str(e)
    else:
        raise AssertionError("50kb/s was read as a rate")


def test_a_daemon_says_a_configuration_error_once(tmp_path: Path) -> None:
    import signal
    import time

    docs = tmp_path / "models.yaml"
    docs.write_text(GROUP.format(path=tmp_path / "other", src=tmp_path))
    p = subprocess.Popen(
        [sys.executable, "-m", "modelcache", "agent", "--node-name", "box",
         "--node-labels", "kubernetes.io/hostname=box", "--cache-dir", str(tmp_path / "cache"),
         "--standalone", str(docs), "--health-addr", "off", "--metrics-addr", "off",
         "--status-interval", "0.1", "--resync", "0.2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3)  # several resyncs and status writes (each a node event)
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert err.count("InvalidConfiguration: LocalModelNodeGroup g1") == 1, err
