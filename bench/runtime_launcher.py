"""How fast the launcher is: the pure parts, `modelcache serve` start to exec, preflight of 140 GB.

    .venv/bin/python bench/runtime_launcher.py [--runs 7]

Targets (issue 7): pure parts (merge + plan) under 50 ms; `modelcache serve --dry-run` and start to
the exec of vLLM under 1 s; preflight of a 140 GB, 30-shard layout (sparse files) under 1 s.
Figures are medians over --runs; the exec is measured with /bin/true standing in for vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.args import merge, parse  # noqa: E402
from runtime.plan import ModelShape, PlanRequest, make_plan  # noqa: E402
from runtime.preflight import preflight  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_hidden_layers": 80,
}


def sparse_model(folder: Path, shards: int, total_bytes: int, tensors_per_shard: int = 40) -> None:
    """A Llama-70B-like layout: config, index and shards whose data is a hole."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    # vLLM runs offline: preflight refuses a folder without tokenizer files, as it should.
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    weight_map = {}
    per_tensor = total_bytes // (shards * tensors_per_shard)
    for s in range(1, shards + 1):
        name = f"model-{s:05d}-of-{shards:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for t in range(tensors_per_shard):
            tensor = f"model.layers.{s}.weight_{t}"
            header[tensor] = {
                "dtype": "BF16",
                "shape": [per_tensor // 2],
                "data_offsets": [t * per_tensor, (t + 1) * per_tensor],
            }
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        with (folder / name).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + tensors_per_shard * per_tensor)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    )


def timed(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.1f} ms (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ns = ap.parse_args()
    modelcache = str(Path(sys.executable).parent / "modelcache")
    runtime_args = ["--model_name=llama", "--http_port=8080", "--max-model-len=8192"]
    service_args = [
        "--port",
        "9000",
        "--max_model_len",
        "32768",
        "-tp",
        "16",
        "--enable-prefix-caching",
        "--gpu-memory-utilization",
        "0.92",
    ]

    def pure() -> None:
        flags = merge(
            parse(["--port", "8080", "--served-model-name", "model"]).flags,
            parse(["--tensor-parallel-size", "16"]).flags,
            parse(runtime_args + service_args).flags,
        )
        make_plan(
            ModelShape.from_config(CONFIG), PlanRequest(8, True, 2, 16, None, ("NVIDIA H100 80GB HBM3",) * 8)
        )
        assert flags

    # Cold: a fresh interpreter importing the pure modules and running them once (what one start pays).
    cold_code = (
        "import time; t0 = time.perf_counter(); "
        "from runtime.args import merge, parse; from runtime.plan import ModelShape, PlanRequest, make_plan; "
        "merge(parse(['--port', '8080']).flags, parse(['-tp', '16', '--max_model_len', '4096']).flags); "
        f"make_plan(ModelShape.from_config({CONFIG!r}), PlanRequest(8, True, 2, 16)); "
        "print(time.perf_counter() - t0)"
    )
    cold = [
        float(
            subprocess.run(
                [sys.executable, "-c", cold_code], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(ns.runs)
    ]
    warm = timed(pure, max(ns.runs, 200))
    print(f"pure parts, cold (import + merge + plan, fresh interpreter): {ms(cold)}  [target < 50 ms]")
    print(
        f"pure parts, warm (merge + plan):                            median {statistics.median(warm) * 1e6:.0f} µs"
    )

    with tempfile.TemporaryDirectory(prefix="modelcache-bench-") as tmp:
        folder = Path(tmp) / "models" / "llama-70b"
        t0 = time.perf_counter()
        sparse_model(folder, shards=30, total_bytes=140 * 10**9)
        print(
            f"fabricated 30 shards, {sum(p.stat().st_size for p in folder.iterdir()) / 1e9:.1f} GB apparent, "
            f"{sum(p.stat().st_blocks for p in folder.iterdir()) * 512 / 1e6:.1f} MB on disk, in {time.perf_counter() - t0:.2f} s"
        )

        first = timed(lambda: preflight(folder), 1)
        again = timed(lambda: preflight(folder), ns.runs)
        report = preflight(folder)
        print(
            f"preflight of 140 GB / 30 shards, first run: {first[0] * 1000:.1f} ms; then {ms(again)}  [target < 1 s] "
            f"({report.files_checked} files, {report.bytes_checked / 1e9:.1f} GB)"
        )

        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in ("TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "RAY_NODE_COUNT", "REQUEST_GPU_COUNT")
        }
        env["REQUEST_GPU_COUNT"] = "8"
        dry = [*runtime_args, *service_args, "--model_dir", str(folder), "--dry-run", "--nodes", "2"]

        def dry_run() -> None:
            subprocess.run([modelcache, "serve", *dry], env=env, capture_output=True, check=True)

        print(
            f"`modelcache serve --dry-run` (70B layout, TP 16 -> 8x2), start to finish: {ms(timed(dry_run, ns.runs))}  [target < 1 s]"
        )

        single = ["--model_dir", str(folder), "--max_model_len", "8192", "-tp", "8"]
        env_exec = {**env, "MODELCACHE_VLLM": "/bin/true"}

        def to_exec() -> None:
            subprocess.run([modelcache, "serve", *single], env=env_exec, capture_output=True, check=True)

        print(
            f"`modelcache serve` start to exec of vLLM (/bin/true), one node:           {ms(timed(to_exec, ns.runs))}  [target < 1 s]"
        )
        baseline = timed(lambda: subprocess.run(["/bin/true"], check=True), ns.runs)
        print(f"  for scale, spawning /bin/true alone:                                    {ms(baseline)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
