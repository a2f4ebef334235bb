"""onnxruntime peer for `gigafactory bench embed`.

`gigafactory bench embed` measures the all-MiniLM-L6-v2 embedding function
(examples/embed) served over HTTP by gigafactory. This script measures the
floor that number is compared with: onnxruntime running the same ONNX model on
the same sentences, in-process, on the same machine, with no HTTP, no sandbox
and no batching.

Each measured request does the work one HTTP request does inside the
function and its host: tokenise ONE sentence (lowercase BERT WordPiece, at
most 256 tokens, like the function), run the model with batch 1, mean-pool
`last_hidden_state` over the attention mask and L2-normalise. Requests run
one after another (closed loop, one in flight), cycling through the
sentences file, for each `intra_op_num_threads` value in --threads.

Usage (the venv needs onnxruntime, numpy and tokenizers):

    python gateway/bench/onnxruntime_embed.py \
        --model-dir models/all-minilm-l6-v2 --sentences sentences.txt

stdout gets exactly one JSON object:

    {"onnxruntime": "<version>",
     "configs": [{"threads": 1, "requests": N, "rps": ..., "p50_ms": ..., "p99_ms": ...}, ...],
     "sequential": <the threads=1 entry>,
     "best": <the entry with the highest rps>,
     "compute": [{"threads": 1, "tokens": 12, "p50_ms": ...}, ...],
     "batched": [{"batch": 1, "sentences_per_s": ...}, ...],
     "best_batched": <the batch size with the most sentences/s, and its threads>}

It also measures the model alone (session.run on the first sentence, per
thread count) and, with the best thread count, throughput when the
sentences are embedded several per run (padded to the longest) for each
--batch-sizes value: onnxruntime at its most efficient.

Progress goes to stderr; errors exit non-zero with a message on stderr.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

try:
    import numpy as np
    import onnxruntime
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
except ImportError as error:  # pragma: no cover - environment problem
    sys.exit(
        f"error: {error} (install with: python3 -m pip install onnxruntime numpy tokenizers)"
    )

# all-MiniLM-L6-v2's embedding width.
DIMENSIONS = 384
# The embedding function's token budget ([CLS] and [SEP] included);
# sentence-transformers' limit for this model (examples/embed MAX_TOKENS).
MAX_TOKENS = 256


class BenchError(Exception):
    """A problem with the inputs, reported on stderr before exiting 1."""


def log(message):
    """Writes a progress line to stderr (stdout carries only the result)."""
    print(message, file=sys.stderr, flush=True)


def parse_threads(text):
    """Parses a comma-separated list of positive thread counts."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"thread counts must be positive integers: {text!r}")
    return values


def parse_args(argv):
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(
        description="onnxruntime peer for `gigafactory bench embed`: "
        "all-MiniLM-L6-v2 embeddings in-process, one sentence per request."
    )
    parser.add_argument(
        "--model-dir",
        required=True,
        type=Path,
        help="directory with model.onnx and tokenizer.json (or vocab.txt)",
    )
    parser.add_argument(
        "--sentences",
        required=True,
        type=Path,
        help="UTF-8 file, one sentence per line (blank lines ignored)",
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured seconds per configuration (default 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds per configuration (default 1)"
    )
    parser.add_argument(
        "--threads",
        type=parse_threads,
        default=list(range(1, cpus + 1)),
        help=f"comma-separated intra_op_num_threads values to try (default 1..{cpus})",
    )
    parser.add_argument(
        "--batch-sizes",
        type=parse_threads,
        default=[1, 4, 8, 16, 32],
        help="comma-separated batch sizes for the batched throughput (default 1,4,8,16,32)",
    )
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error("--seconds must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def load_tokenizer(model_dir):
    """Lowercase BERT WordPiece, truncated to MAX_TOKENS, no padding.

    Prefers tokenizer.json (as tests/data/reference.py does); falls back to
    vocab.txt with the standard uncased BERT pipeline.
    """
    tokenizer_json = model_dir / "tokenizer.json"
    vocab_txt = model_dir / "vocab.txt"
    if tokenizer_json.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    elif vocab_txt.is_file():
        tokenizer = BertWordPieceTokenizer(str(vocab_txt), lowercase=True)
    else:
        raise BenchError(f"{model_dir} has neither tokenizer.json nor vocab.txt")
    # tokenizer.json pads to 128 and truncates at 128; a request is
    # tokenised like the function does it: unpadded, at most MAX_TOKENS.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return tokenizer


def load_sentences(path):
    """The non-blank lines of `path`, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchError(f"sentences file not found: {path}")
    except UnicodeDecodeError as error:
        raise BenchError(f"{path} is not UTF-8: {error}")
    except OSError as error:
        raise BenchError(f"reading {path}: {error}")
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise BenchError(f"{path} has no sentences")
    return sentences


def make_session(model_path, threads):
    """A CPU session with one inter-op thread and `threads` intra-op threads."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own exception types
        raise BenchError(f"loading {model_path}: {error}")


def embed(session, tokenizer, sentence):
    """One request's work: tokenise, run with batch 1, mean-pool, normalise."""
    ids = tokenizer.encode(sentence).ids
    length = len(ids)
    mask = np.ones((1, length), dtype=np.int64)
    feed = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((1, length), dtype=np.int64),
    }
    hidden = session.run(["last_hidden_state"], feed)[0]  # [1, length, 384]
    # Mean over the tokens the mask keeps (all of them at batch 1; written
    # out in full so the work matches the function's pooling).
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1)[0] / max(float(weights.sum()), 1.0)
    norm = float(np.linalg.norm(pooled))
    return pooled / norm if norm > 0 else pooled


def check_embedding(session, tokenizer, sentence):
    """Fails unless `sentence` embeds to a 384-dim unit vector."""
    embedding = embed(session, tokenizer, sentence)
    if embedding.shape != (DIMENSIONS,):
        raise BenchError(
            f"embedding has shape {embedding.shape}, expected ({DIMENSIONS},): wrong model?"
        )
    norm = float(np.linalg.norm(embedding))
    if not math.isclose(norm, 1.0, abs_tol=1e-4):
        raise BenchError(f"embedding norm is {norm}, expected 1")


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list."""
    rank = max(math.ceil(fraction * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def measure(session, tokenizer, sentences, warmup, seconds):
    """Closed-loop requests, one at a time: warm-up, then `seconds` measured.

    Returns (requests, elapsed seconds, ascending latencies in seconds).
    """
    count = len(sentences)
    index = 0
    clock = time.perf_counter

    deadline = clock() + warmup
    while clock() < deadline:
        embed(session, tokenizer, sentences[index % count])
        index += 1

    latencies = []
    start = clock()
    deadline = start + seconds
    now = start
    while now < deadline:
        before = now
        embed(session, tokenizer, sentences[index % count])
        index += 1
        now = clock()
        latencies.append(now - before)
    elapsed = now - start
    latencies.sort()
    return len(latencies), elapsed, latencies


def run(args):
    model_path = args.model_dir / "model.onnx"
    if not args.model_dir.is_dir():
        raise BenchError(f"model directory not found: {args.model_dir}")
    if not model_path.is_file():
        raise BenchError(f"{args.model_dir} has no model.onnx")
    tokenizer = load_tokenizer(args.model_dir)
    sentences = load_sentences(args.sentences)
    log(
        f"onnxruntime {onnxruntime.__version__}: {len(sentences)} sentences, "
        f"threads {args.threads}, {args.warmup:g}s warm-up + {args.seconds:g}s each"
    )

    # Correctness first: a benchmark of the wrong model measures nothing.
    check_embedding(make_session(model_path, 1), tokenizer, sentences[0])
    log(f"check: first sentence embeds to a {DIMENSIONS}-dim unit vector")

    configs = []
    for threads in args.threads:
        session = make_session(model_path, threads)
        requests, elapsed, latencies = measure(
            session, tokenizer, sentences, args.warmup, args.seconds
        )
        config = {
            "threads": threads,
            "requests": requests,
            "rps": round(requests / elapsed, 2),
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        }
        log(
            f"threads={threads}: {config['rps']} req/s, "
            f"p50 {config['p50_ms']} ms, p99 {config['p99_ms']} ms ({requests} requests)"
        )
        configs.append(config)
        del session

    sequential = next((c for c in configs if c["threads"] == 1), None)
    best = max(configs, key=lambda c: c["rps"])

    # The model alone on the first sentence: session.run and nothing else.
    compute = []
    for threads in args.threads:
        session = make_session(model_path, threads)
        latencies = measure_compute(session, tokenizer, sentences[0], args.warmup, args.seconds)
        compute.append(
            {
                "threads": threads,
                "tokens": len(tokenizer.encode(sentences[0]).ids),
                "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
            }
        )
        log(f"compute alone, threads={threads}: p50 {compute[-1]['p50_ms']} ms")
        del session

    # Throughput at its best: the sentences in batches, padded to the longest.
    session = make_session(model_path, best["threads"])
    batched = []
    for size in args.batch_sizes:
        count, elapsed = measure_batched(
            session, tokenizer, sentences, size, args.warmup, args.seconds
        )
        batched.append({"batch": size, "sentences_per_s": round(count / elapsed, 2)})
        log(f"batch {size}, threads={best['threads']}: {batched[-1]['sentences_per_s']} sentences/s")
    best_batched = max(batched, key=lambda b: b["sentences_per_s"])
    best_batched["threads"] = best["threads"]
    return {
        "onnxruntime": onnxruntime.__version__,
        "configs": configs,
        "sequential": sequential,
        "best": best,
        "compute": compute,
        "batched": batched,
        "best_batched": best_batched,
    }


def measure_compute(session, tokenizer, sentence, warmup, seconds):
    """session.run alone on one sentence, repeatedly; ascending latencies."""
    ids = tokenizer.encode(sentence).ids
    feed = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "token_type_ids": np.zeros((1, len(ids)), dtype=np.int64),
    }
    clock = time.perf_counter
    deadline = clock() + warmup
    while clock() < deadline:
        session.run(["last_hidden_state"], feed)
    latencies = []
    deadline = clock() + seconds
    while clock() < deadline:
        before = clock()
        session.run(["last_hidden_state"], feed)
        latencies.append(clock() - before)
    latencies.sort()
    return latencies


def embed_batch(session, tokenizer, batch):
    """Tokenise, pad to the longest, run once, mean-pool and normalise each."""
    encodings = [tokenizer.encode(sentence).ids for sentence in batch]
    longest = max(len(ids) for ids in encodings)
    ids = np.zeros((len(batch), longest), dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding)] = encoding
        mask[row, : len(encoding)] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    hidden = session.run(["last_hidden_state"], feed)[0]
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def measure_batched(session, tokenizer, sentences, size, warmup, seconds):
    """Sentences in turn, `size` per run; returns (sentences, elapsed seconds)."""
    count = len(sentences)
    index = 0
    clock = time.perf_counter

    def next_batch():
        nonlocal index
        batch = [sentences[(index + i) % count] for i in range(size)]
        index += size
        return batch

    deadline = clock() + warmup
    while clock() < deadline:
        embed_batch(session, tokenizer, next_batch())
    done = 0
    start = clock()
    while clock() - start < seconds:
        embed_batch(session, tokenizer, next_batch())
        done += size
    return done, clock() - start


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
