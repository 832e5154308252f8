"""Measuring a model the same way every time: size, zipped size, parameters, latency, outputs.

Latency is timed with ONNX Runtime under a fixed number of threads, after warm-up, over
repeats; we report p50 and p95. Size is the bytes of the ONNX file a user downloads, and its
zipped size, which is where unstructured sparsity shows.
"""
from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

BENCH_THREADS = int(os.environ.get("EXPLORER_BENCH_THREADS", "1"))
WARMUP = int(os.environ.get("EXPLORER_BENCH_WARMUP", "20"))
REPEATS = int(os.environ.get("EXPLORER_BENCH_REPEATS", "200"))
BATCH = 256
BATCH_REPEATS = int(os.environ.get("EXPLORER_BENCH_BATCH_REPEATS", "30"))

# Quantization bookkeeping tensors are not parameters a user would count.
_BOOKKEEPING_SUFFIXES = ("_scale", "_zero_point", "_quantized_scale", "_quantized_zero_point")


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = BENCH_THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def file_sizes(path: Path) -> dict:
    data = Path(path).read_bytes()
    return {"size_bytes": len(data), "zipped_bytes": len(zlib.compress(data, 9))}


def parameter_counts(path: Path) -> dict:
    graph = onnx.load(str(path)).graph
    initializers = {t.name: t for t in graph.initializer}
    params = nonzero = 0
    for name, tensor in initializers.items():
        if name.endswith(_BOOKKEEPING_SUFFIXES):
            continue
        values = numpy_helper.to_array(tensor)
        if values.size <= 1 or not np.issubdtype(values.dtype, np.number):
            continue  # scalars are not weights
        if np.issubdtype(values.dtype, np.integer) and not name.endswith("_quantized"):
            continue  # shape constants that the quantizer adds are not weights either
        params += int(values.size)
        zero_point = _zero_point(initializers, name, values)
        nonzero += int(np.count_nonzero(values.astype(np.int64) - zero_point if zero_point is not None else values))
    return {"params": params, "nonzero_params": nonzero}


def _zero_point(initializers: dict, name: str, values: np.ndarray):
    """An int8 weight's 'zero' is its stored zero point, per tensor or per channel."""
    if not np.issubdtype(values.dtype, np.integer) or not name.endswith("_quantized"):
        return None
    zp_tensor = initializers.get(name[: -len("_quantized")] + "_zero_point")
    if zp_tensor is None:
        return 0
    zp = numpy_helper.to_array(zp_tensor).astype(np.int64)
    if zp.size == 1:
        return zp.reshape(())
    if values.ndim == 2:  # MatMul weights (K, N) are quantized per output column
        return zp.reshape(1, -1)
    return zp.reshape((-1,) + (1,) * (values.ndim - 1))  # Conv weights per output channel


def run_outputs(sess: ort.InferenceSession, inputs: np.ndarray, batch: int = BATCH) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)]
    return np.concatenate(outs)


def _time_calls(sess, feed: dict, warmup: int, repeats: int) -> np.ndarray:
    for _ in range(warmup):
        sess.run(None, feed)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times[i] = time.perf_counter() - start
    return times * 1000.0


def measure_latency(paths: list[Path], inputs: np.ndarray) -> list[dict]:
    """Time several models side by side, interleaved in rounds, so machine noise hits all alike."""
    sessions = [session(p) for p in paths]
    name = sessions[0].get_inputs()[0].name
    single = {name: inputs[:1]}
    batch_inputs = np.resize(inputs, (BATCH, *inputs.shape[1:])).astype(inputs.dtype)
    batch_feed = {name: batch_inputs}
    rounds = 5
    single_times = [[] for _ in sessions]
    batch_times = [[] for _ in sessions]
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            single_times[i].append(_time_calls(sess, single, WARMUP // rounds + 1, REPEATS // rounds))
            batch_times[i].append(_time_calls(sess, batch_feed, 2, max(1, BATCH_REPEATS // rounds)))
    results = []
    for i in range(len(sessions)):
        s = np.concatenate(single_times[i])
        b = np.concatenate(batch_times[i])
        results.append({
            "latency_ms": {"p50": float(np.percentile(s, 50)), "p95": float(np.percentile(s, 95)), "batch": 1},
            "batch_latency_ms": {"p50": float(np.percentile(b, 50)), "p95": float(np.percentile(b, 95)),
                                 "batch": BATCH},
            "throughput_per_s": float(BATCH / (np.percentile(b, 50) / 1000.0)),
            "threads": BENCH_THREADS,
        })
    return results
