"""Write the quickstart's sample model: a tiny Llama-shaped folder that `modelcache serve` accepts
(config, tokenizer, one real safetensors file), so the embedded default runs the whole chain:
cache -> status -> serving plan. Usage: quickstart_model.py FOLDER"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    hidden, layers, vocab = 64, 2, 256
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    vocab_map = {f"<{i}>": i for i in range(vocab)}
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab_map, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    # safetensors: an 8-byte little-endian header length, the JSON header, then the tensors' bytes.
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = [hidden, hidden]
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = shape[0] * shape[1] * 2  # float16
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(b"\x00\x3c" * (offset // 2))  # every weight 1.0 in float16


if __name__ == "__main__":
    main(Path(sys.argv[1]))
