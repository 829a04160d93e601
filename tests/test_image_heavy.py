"""The agent's image built and run, not only read: Dockerfile.agent built with buildah on a Debian
base made by debootstrap (no registry is reachable here; the Python base is the Dockerfile's
``PYTHON_IMAGE`` build argument), then ``modelcache agent --standalone ... --once`` run inside it
as the image's non-root user with ``buildah run --isolation chroot`` (the default OCI runtime cannot
run here: cgroups in hybrid mode), against a model on a ``file://`` source mounted read-only. The
model must be published, byte for byte, owned by the image's user.

Skipped unless MODELCACHE_IMAGE_HEAVY=1 (``scripts/image-heavy-tests`` sets it), as root, with
buildah and debootstrap installed. The debootstrapped base is kept between runs in
MODELCACHE_IMAGE_CACHE (default /var/tmp/modelcache-image-cache; about 1-3 min to make, 190 MB) and
in buildah's storage as ``localhost/modelcache-test-base:bookworm``; the image built here and its
containers are removed at the end. Build time and image size are printed (``-s``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localmodel.layout import storage_key

REPO = Path(__file__).resolve().parent.parent
BASE = "localhost/modelcache-test-base:bookworm"
IMAGE = "localhost/modelcache:image-heavy-test"
USER = 65532  # Dockerfile.agent's USER
MIRROR = os.environ.get("MODELCACHE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("MODELCACHE_IMAGE_CACHE", "/var/tmp/modelcache-image-cache"))
# What the base needs beyond minbase: the Python of Debian 12 (3.11, the release requirements/
# agent.txt is locked for), venv (the Dockerfile makes two), `python` (the Dockerfile calls it by
# that name, as python:*-slim images have it) and CA certificates for pip.
PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("MODELCACHE_IMAGE_HEAVY") != "1",
        reason="set MODELCACHE_IMAGE_HEAVY=1 (builds an image; scripts/image-heavy-tests)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah with chroot isolation needs root here"),
    pytest.mark.skipif(
        not (shutil.which("buildah") and shutil.which("debootstrap")),
        reason="needs buildah and debootstrap (apt-get install buildah debootstrap)",
    ),
    pytest.mark.timeout(1200),
]


def run(*argv: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return r


def _base() -> None:
    """The base image: Debian 12 minbase plus Python, as a python:*-slim image is, made here."""
    if run("buildah", "inspect", "--type", "image", BASE, check=False).returncode == 0:
        return
    rootfs, done = CACHE / "rootfs", CACHE / "rootfs.complete"
    if not done.exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        run("debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(rootfs), MIRROR)
        print(f"\ndebootstrap: {time.monotonic() - started:.0f} s")
        # What python:*-slim leaves out too: package lists and downloaded packages.
        for folder in (rootfs / "var/cache/apt", rootfs / "var/lib/apt/lists"):
            for entry in folder.iterdir():
                if entry.is_file() or entry.is_symlink():
                    entry.unlink()
                elif entry.is_dir():
                    shutil.rmtree(entry)
        # The machine's CA bundle: pip inside the build verifies TLS against it (a proxy's CA
        # included, where there is one).
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
        done.touch()
    tar = CACHE / "rootfs.tar"
    run("tar", "-C", str(rootfs), "-cf", str(tar), ".")
    try:
        ctr = run("buildah", "from", "scratch").stdout.strip()
        try:
            run("buildah", "add", ctr, str(tar), "/")
            run("buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", "python3", ctr)
            run("buildah", "commit", ctr, BASE)
        finally:
            run("buildah", "rm", ctr, check=False)
    finally:
        tar.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    _base()
    started = time.monotonic()
    run(
        "buildah", "bud", "--isolation", "chroot", "--layers=false",
        "--build-arg", f"PYTHON_IMAGE={BASE}",
        "-f", str(REPO / "Dockerfile.agent"), "-t", IMAGE, str(REPO),
    )  # fmt: skip
    took = time.monotonic() - started
    listed = json.loads(run("buildah", "images", "--json", IMAGE).stdout)
    base = json.loads(run("buildah", "images", "--json", BASE).stdout)
    print(f"\nDockerfile.agent built in {took:.0f} s: image {listed[0]['size']} (base {base[0]['size']})")
    try:
        yield IMAGE
    finally:
        run("buildah", "rmi", "--force", IMAGE, check=False)


def test_the_image_runs_as_its_non_root_user_with_modelcache_as_entrypoint(image: str) -> None:
    config = json.loads(run("buildah", "inspect", "--type", "image", image).stdout)["OCIv1"]["config"]
    assert config["User"] == f"{USER}:{USER}"
    assert config["Entrypoint"] == ["modelcache"]


def test_the_agent_publishes_a_model_as_the_images_user(image: str, tmp_path: Path) -> None:
    source, cache, docs = tmp_path / "src" / "tiny", tmp_path / "cache", tmp_path / "docs"
    source.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "bert"}\n', "model.safetensors": os.urandom(300_000)}
    for name, data in files.items():
        (source / name).write_bytes(data)
    cache.mkdir()
    os.chown(cache, USER, USER)  # the node's folder, as the DaemonSet's init container leaves it
    docs.mkdir()
    uri = "file:///src/tiny"
    (docs / "cache.yaml").write_text(
        f"""\
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelNodeGroup
metadata: {{name: box}}
spec:
  storageLimit: 1Gi
  persistentVolumeSpec:
    hostPath: {{path: /models}}
    nodeAffinity:
      required:
        nodeSelectorTerms:
        - matchExpressions:
          - {{key: kubernetes.io/hostname, operator: In, values: [box]}}
  persistentVolumeClaimSpec: {{}}
---
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelCache
metadata: {{name: tiny}}
spec:
  sourceModelUri: {uri}
  modelSize: 1Mi
  nodeGroups: [box]
"""
    )
    ctr = run("buildah", "from", image).stdout.strip()
    try:
        mounts = [
            "-v", f"{tmp_path / 'src'}:/src:ro",
            "-v", f"{cache}:/models",
            "-v", f"{docs}:/docs:ro",
        ]  # fmt: skip

        def inside(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return run("buildah", "run", "--isolation", "chroot", *mounts, ctr, "--", *argv, check=check)

        assert inside("id", "-u").stdout.strip() == str(USER)
        started = time.monotonic()
        agent = inside(
            "modelcache", "agent", "--node-name", "box", "--cache-dir", "/models",
            "--standalone", "/docs", "--node-labels", "kubernetes.io/hostname=box",
            "--health-addr", "off", "--metrics-addr", "off", "--once",
            check=False,
        )  # fmt: skip
        print(f"\nagent --once in the image: {time.monotonic() - started:.1f} s")
        assert agent.returncode == 0, agent.stderr
        assert "DownloadCompleted: tiny" in agent.stderr
        status = json.loads(
            inside("modelcache", "status", "--cache-dir", "/models", "--output", "json").stdout
        )
        assert status["status"]["modelStatus"] == {"tiny": "ModelDownloaded"}
    finally:
        run("buildah", "rm", ctr, check=False)

    published = cache / "models" / storage_key(uri)
    assert sorted(p.name for p in published.iterdir()) == sorted(files)
    for name, data in files.items():
        path = published / name
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert (path.stat().st_uid, path.stat().st_gid) == (USER, USER)
