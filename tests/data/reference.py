"""Regenerates tests/data/reference.json: all-MiniLM-L6-v2 (int8 ONNX)
embeddings computed by onnxruntime, the reference the platform must match.

    python3 -m pip install onnxruntime numpy tokenizers
    python3 tests/data/reference.py models/all-minilm-l6-v2 > tests/data/reference.json
"""
import json
import sys

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar.",
    "Café owners in Zürich don't like noisy neighbours!",
]

model_dir = sys.argv[1]
tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tokenizer.no_padding()
tokenizer.no_truncation()
session = onnxruntime.InferenceSession(f"{model_dir}/model.onnx")
cases = []
for sentence in SENTENCES:
    ids = tokenizer.encode(sentence).ids
    feed = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "token_type_ids": np.zeros((1, len(ids)), dtype=np.int64),
    }
    hidden = session.run(["last_hidden_state"], feed)[0][0]
    embedding = hidden.mean(axis=0)
    embedding /= np.linalg.norm(embedding)
    cases.append({"text": sentence, "ids": ids, "embedding": [round(float(v), 7) for v in embedding]})
json.dump({"model": "all-minilm-l6-v2", "cases": cases}, sys.stdout, indent=1, ensure_ascii=False)
print()
