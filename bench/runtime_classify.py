"""How fast the classification server's pure parts are: request parsing, post-processing, responses.

    .venv/bin/python bench/runtime_classify.py [--batch 256] [--classes 3] [--runs 50]

The model's forward pass dominates a real request; this shows what the protocol handling adds per
batch (target: well under 1 ms per input, so it never matters next to the model). Plain lists stand in
for the logits tensor (a tensor is converted with one `.tolist()` before this code runs).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.classify import (
    OutputOptions,
    classify_logits,
    v1_inputs,
    v1_response,
    v2_inputs,
    v2_response,
)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--runs", type=int, default=50)
    a = p.parse_args()
    rng = random.Random(0)
    texts = [f"text number {i} " * 8 for i in range(a.batch)]
    logits = [[rng.gauss(0, 3) for _ in range(a.classes)] for _ in range(a.batch)]
    id2label = {str(i): f"CLASS_{i}" for i in range(a.classes)}
    v1_body = json.dumps({"instances": texts})
    v2_body = json.dumps(
        {"inputs": [{"name": "input-0", "shape": [a.batch], "datatype": "BYTES", "data": texts}]}
    )
    opts = OutputOptions(return_probabilities=True, use_id2label=True)

    def once_v1() -> None:
        v1_inputs(json.loads(v1_body))
        json.dumps(v1_response(classify_logits(logits, id2label, use_id2label=True), opts))

    def once_v2() -> None:
        v2_inputs(json.loads(v2_body))
        result = classify_logits(logits, id2label, use_id2label=True)
        json.dumps(v2_response(result, opts, model_name="m", request_id="r"))

    for name, fn in (("v1 predict", once_v1), ("v2 infer", once_v2)):
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(
            f"{name}: batch {a.batch} x {a.classes} classes, parse + post-process + JSON: median "
            f"{med * 1e3:.2f} ms ({med / a.batch * 1e6:.1f} µs per input)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
