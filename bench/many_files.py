"""Benchmark: a repository of many small files, `modelcache pull` beside `snapshot_download`.

    .venv/bin/python bench/many_files.py [--files 100000] [--size 1024] [--workdir /tmp/modelcache-many]
                                          [--concurrency 16] [--skip-snapshot]

Builds ``--files`` files of ``--size`` bytes (in folders of 1,000), serves them from the local
Hugging Face-compatible hub (tests/support/hfhub.py, in its own process, tree pages of 1,000
entries), then pulls the repository into a fresh folder with `modelcache pull` and with
huggingface_hub's ``snapshot_download`` (what KServe's storage initializer uses), one after the
other in the same run. For each: wall time, peak RSS (``wait4``) and peak open descriptors (its
``/proc/PID/fd`` sampled every 10 ms), and the ratios. The point is the scale: descriptors bounded
by the concurrency and memory that does not grow with the file count beyond the listing itself.
Absolute numbers on a shared 2-core machine are noise; the ratios within one run are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

HUB = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.support.hfhub import Hub
async def main():
    hub = Hub(page_size=1000)
    src = Path({src!r})
    files = {{p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*.bin"))}}
    hub.add_repo("bench/many", files)
    hub.requests = _Discard()
    await hub.start()
    print(hub.endpoint, flush=True)
    await asyncio.Event().wait()
class _Discard(list):
    def append(self, item): pass
asyncio.run(main())
"""


def build(src: Path, files: int, size: int) -> None:
    marker = src / ".done"
    if marker.exists() and json.loads(marker.read_text()) == [files, size]:
        return
    shutil.rmtree(src, ignore_errors=True)
    block = os.urandom(size + files)
    for i in range(files):
        path = src / f"d{i // 1000:03d}" / f"f{i:06d}.bin"
        if i % 1000 == 0:
            path.parent.mkdir(parents=True)
        path.write_bytes(block[i : i + size])  # every file different
    marker.write_text(json.dumps([files, size]))


def measure(argv: list[str], env: dict[str, str], timeout: float) -> dict[str, float]:
    """Wall seconds, peak RSS (MiB) and peak open descriptors of one process."""
    # Its stderr goes to a file, not a pipe: a progress bar would fill the pipe and block the tool.
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log)
        peak_fds = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_fds
            fd_dir = Path(f"/proc/{proc.pid}/fd")
            while not done.is_set():
                with contextlib.suppress(OSError):
                    peak_fds = max(peak_fds, len(os.listdir(fd_dir)))
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        timer.cancel()
        done.set()
        sampler.join()
        log.seek(0)
        err = log.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{argv[:4]} exited {code} after {seconds:.0f} s: {err.strip()[-500:]}")
    return {"seconds": seconds, "rss_mib": usage.ru_maxrss / 1024, "fds": peak_fds}


def fresh(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / ".modelcache", ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.sync()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelcache-many"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per tool")
    parser.add_argument("--skip-snapshot", action="store_true")
    args = parser.parse_args()
    src, out = args.workdir / "src", args.workdir / "out" / "many"
    t = time.perf_counter()
    build(src, args.files, args.size)
    print(f"{args.files} files of {args.size} bytes ready in {time.perf_counter() - t:.0f} s", flush=True)
    hub = subprocess.Popen([PY, "-c", HUB.format(root=str(ROOT), src=str(src))], stdout=subprocess.PIPE)
    results: dict[str, dict[str, float]] = {}
    try:
        assert hub.stdout is not None
        endpoint = hub.stdout.readline().decode().strip()
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(args.workdir / "hf-home")}
        mc = str(Path(PY).parent / "modelcache")
        fresh(out)
        pull = [mc, "pull", "hf://bench/many", str(out), "--quiet", "--concurrency", str(args.concurrency)]
        results["modelcache pull"] = measure(pull, env, args.timeout)
        got = sum(1 for p in out.rglob("*.bin"))
        assert got == args.files, f"modelcache pull left {got} of {args.files} files"
        if not args.skip_snapshot:
            fresh(out)
            shutil.rmtree(args.workdir / "hf-home", ignore_errors=True)
            snap = (
                "from huggingface_hub import snapshot_download; "
                f"snapshot_download('bench/many', local_dir={str(out)!r})"
            )
            results["huggingface_hub.snapshot_download"] = measure([PY, "-c", snap], env, args.timeout)
    finally:
        hub.kill()
        hub.wait()
    print(f"\n{args.files} files of {args.size} bytes, from the local hub:")
    print(f"{'tool':40} {'seconds':>9} {'files/s':>9} {'peak RSS MiB':>13} {'peak fds':>9}")
    for name, r in results.items():
        rate = args.files / r["seconds"]
        print(f"{name:40} {r['seconds']:9.1f} {rate:9.0f} {r['rss_mib']:13.0f} {r['fds']:9.0f}")
    if len(results) == 2:
        ours, theirs = results["modelcache pull"], results["huggingface_hub.snapshot_download"]
        print("\nratios (modelcache pull / snapshot_download):")
        print(f"  speed: {theirs['seconds'] / ours['seconds']:.2f}x")
        print(f"  peak RSS: {ours['rss_mib'] / theirs['rss_mib']:.2f}x")
        print(f"  peak descriptors: {ours['fds'] / theirs['fds']:.2f}x")


if __name__ == "__main__":
    main()
