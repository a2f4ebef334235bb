"""Regenerates tests/data/lora/adapter.gguf: a LoRA adapter for the shipped
SmolLM2-135M-Instruct (llama architecture, 30 layers, width 576, 3 KV
heads of 64): rank 8 on every layer's attention value projection, random
(seeded) and large enough that greedy answers change. Written with the
`gguf` package llama.cpp's own converters use.

    python3 -m pip install gguf==0.19.0 numpy
    python3 tests/data/lora/lora.py tests/data/lora/adapter.gguf
"""
import sys

import gguf
import numpy as np

LAYERS, WIDTH, KV_WIDTH, RANK = 30, 576, 192, 8

rng = np.random.default_rng(7)
writer = gguf.GGUFWriter(sys.argv[1], "llama")
writer.add_string("general.type", "adapter")
writer.add_string("adapter.type", "lora")
writer.add_float32("adapter.lora.alpha", float(RANK))
for layer in range(LAYERS):
    # ggml's shapes: lora_a is [width, rank], lora_b [rank, kv width]
    # (numpy's are the reverse).
    a = rng.normal(0.0, 0.25, size=(RANK, WIDTH)).astype(np.float32)
    b = rng.normal(0.0, 0.25, size=(KV_WIDTH, RANK)).astype(np.float32)
    writer.add_tensor(f"blk.{layer}.attn_v.weight.lora_a", a)
    writer.add_tensor(f"blk.{layer}.attn_v.weight.lora_b", b)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
