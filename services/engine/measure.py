"""Measuring a model the same way every time: size, zipped size, parameters, latency, outputs.

Latency is timed with ONNX Runtime under a fixed number of threads, after warm-up, over
repeats; we report p50 and p95. Size is the bytes of the ONNX file a user downloads, and its
zipped size, which is where unstructured sparsity shows.
"""
from __future__ import annotations

import os
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from services.engine.tasks.base import EvalSet

BENCH_THREADS = int(os.environ.get("EXPLORER_BENCH_THREADS", "1"))
WARMUP = int(os.environ.get("EXPLORER_BENCH_WARMUP", "20"))
REPEATS = int(os.environ.get("EXPLORER_BENCH_REPEATS", "200"))
BATCH_REPEATS = int(os.environ.get("EXPLORER_BENCH_BATCH_REPEATS", "30"))
# Large models get fewer repeats: enough for a stable median without minutes of timing.
SECONDS_PER_MODEL = float(os.environ.get("EXPLORER_BENCH_SECONDS", "4"))
# A model's card is a first look; every compress job times the original again, side by side with
# the result, on the full budget. So cards (prepare, import) time on a shorter one.
CARD_SECONDS = min(SECONDS_PER_MODEL, float(os.environ.get("EXPLORER_CARD_SECONDS", "1.5")))

# Quantization bookkeeping tensors are not parameters a user would count.
_BOOKKEEPING_SUFFIXES = ("_scale", "_zero_point", "_quantized_scale", "_quantized_zero_point")


def session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime session with the fixed timing settings; reused within a job for the same
    file (creating one for a 90 MB model costs about a second)."""
    stat = Path(path).stat()
    return _session(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def fresh_session(path: Path) -> ort.InferenceSession:
    """A session that is not kept: for many short-lived files (a sensitivity scan's one-layer models)."""
    return _session.__wrapped__(str(Path(path).resolve()), 0, 0)


@lru_cache(maxsize=4)
def _session(path: str, mtime_ns: int, size: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = BENCH_THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def file_sizes(path: Path) -> dict:
    data = Path(path).read_bytes()
    # Level 6 is what zip uses by default; level 9 took 4.2 s on an 86 MB model for <1% smaller.
    return {"size_bytes": len(data), "zipped_bytes": len(zlib.compress(data, 6))}


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int) -> onnx.ModelProto:
    return onnx.load(path)


def load_model(path: Path) -> onnx.ModelProto:
    """The parsed ONNX file, parsed once per job (the counts below all read it)."""
    return _load(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)


def parameter_counts(path: Path) -> dict:
    graph = load_model(path).graph
    initializers = {t.name: t for t in graph.initializer}
    # A static (QDQ) model says along which axis each weight's scales and zero points run.
    axes = {node.input[0]: next((a.i for a in node.attribute if a.name == "axis"), 1)
            for node in graph.node if node.op_type == "DequantizeLinear"}
    four_bit, block_bookkeeping = _four_bit_weights(graph, initializers)
    params = nonzero = 0
    for name, tensor in initializers.items():
        if name in four_bit:
            params += four_bit[name][0]
            nonzero += four_bit[name][1]
            continue
        if name.endswith(_BOOKKEEPING_SUFFIXES) or name in block_bookkeeping:
            continue
        values = numpy_helper.to_array(tensor)
        if values.size <= 1 or not np.issubdtype(values.dtype, np.number):
            continue  # scalars are not weights
        if np.issubdtype(values.dtype, np.integer) and not name.endswith("_quantized"):
            continue  # shape constants that the quantizer adds are not weights either
        params += int(values.size)
        zero_point = _zero_point(initializers, name, values, axes.get(name))
        nonzero += int(np.count_nonzero(values.astype(np.int64) - zero_point if zero_point is not None else values))
    return {"params": params, "nonzero_params": nonzero}


def _four_bit_weights(graph, initializers: dict) -> tuple[dict, set]:
    """Weights stored in 4-bit blocks (quantize.int4_weights): {initializer: (weights, non-zero weights)},
    and the names of their block scales and zero points, which are bookkeeping. MatMulNBits packs
    two weights a byte, low nibble first, per output column in blocks padded to block_size;
    GatherBlockQuantized keeps the table's shape. A weight is zero when it equals its block's zero
    point (default 8 for unsigned, 0 for signed 4-bit)."""
    weights, bookkeeping = {}, set()
    for node in graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        data_index = 1 if node.op_type == "MatMulNBits" else 0
        name = node.input[data_index]
        if name not in initializers or attrs.get("bits", 4) != 4:
            continue
        bookkeeping.update(node.input[2:4])  # both ops: input 2 the block scales, 3 the zero points
        block = attrs["block_size"]
        zp_name = node.input[3] if len(node.input) > 3 else ""
        if node.op_type == "MatMulNBits":
            packed = numpy_helper.to_array(initializers[name])
            n, k = attrs["N"], attrs["K"]
            values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1, block)
            if zp_name in initializers:
                zp_packed = numpy_helper.to_array(initializers[zp_name]).reshape(n, -1)
                zp = np.stack([zp_packed & 0x0F, zp_packed >> 4], axis=-1).reshape(n, -1)[:, :values.shape[1]]
            else:
                zp = np.full(values.shape[:2], 8)
            is_nonzero = (values.astype(np.int64) != zp[..., None]).reshape(n, -1)[:, :k]
            weights[name] = (n * k, int(is_nonzero.sum()))
        else:
            tensor = initializers[name]
            values = numpy_helper.to_array(tensor).astype(np.int64)
            axis = attrs.get("quantize_axis", 1) % values.ndim
            if zp_name in initializers:
                zp = numpy_helper.to_array(initializers[zp_name]).astype(np.int64)
                zp = np.repeat(zp, block, axis=axis).take(range(values.shape[axis]), axis=axis)
            else:
                zp = 8 if tensor.data_type == onnx.TensorProto.UINT4 else 0
            weights[name] = (int(values.size), int(np.count_nonzero(values - zp)))
    return weights, bookkeeping


def _zero_point(initializers: dict, name: str, values: np.ndarray, axis: int | None = None):
    """An int8 weight's 'zero' is its stored zero point, per tensor or per channel (along `axis`
    when a DequantizeLinear names it: a Gemm's (N, K) weight is quantized along axis 0)."""
    if not np.issubdtype(values.dtype, np.integer) or not name.endswith("_quantized"):
        return None
    zp_tensor = initializers.get(name[: -len("_quantized")] + "_zero_point")
    if zp_tensor is None:
        return 0
    zp = numpy_helper.to_array(zp_tensor).astype(np.int64)
    if zp.size == 1:
        return zp.reshape(())
    if axis is not None:
        return zp.reshape([-1 if d == axis % values.ndim else 1 for d in range(values.ndim)])
    if values.ndim == 2:  # MatMul weights (K, N) are quantized per output column
        return zp.reshape(1, -1)
    return zp.reshape((-1,) + (1,) * (values.ndim - 1))  # Conv weights per output channel


def run_outputs(sess: ort.InferenceSession, evaluation: EvalSet, batch: int = 64) -> np.ndarray:
    """The scored output of the model (the first, unless the task names one) over the whole
    evaluation set, in batches."""
    n = len(evaluation)
    # A model with several outputs (speech: digits and speaker) names the one its task scores.
    wanted = [evaluation.extra["output_name"]] if evaluation.extra.get("output_name") else None
    outs = [sess.run(wanted, {k: v[i:i + batch] for k, v in evaluation.inputs.items()})[0] for i in range(0, n, batch)]
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


def measure_latency(paths: list[Path], evaluation: EvalSet | list[EvalSet],
                    seconds: float | None = None) -> list[dict]:
    """Time several models side by side, interleaved in rounds, so machine noise hits all alike.
    `evaluation` is one set for all, or one per model (a trimmed vocabulary numbers its tokens
    differently: the same sentences, other ids). `seconds` is the timing budget per model
    (EXPLORER_BENCH_SECONDS by default)."""
    sessions = [session(p) for p in paths]
    evaluations = evaluation if isinstance(evaluation, list) else [evaluation] * len(paths)
    batch = evaluations[0].latency_batch
    singles = [e.head(1) for e in evaluations]
    batch_feeds = [e.head(batch) for e in evaluations]
    rounds = 5
    # One call of each to size the repeats to the time budget (half for batch 1, half for the batch).
    slowest_single = max(_time_calls(sess, feed, 1, 1)[0] for sess, feed in zip(sessions, singles)) / 1000
    slowest_batch = max(_time_calls(sess, feed, 0, 1)[0] for sess, feed in zip(sessions, batch_feeds)) / 1000
    budget = (SECONDS_PER_MODEL if seconds is None else seconds) / 2
    repeats = int(min(REPEATS, max(20, budget / max(slowest_single, 1e-6))))
    batch_repeats = int(min(BATCH_REPEATS, max(5, budget / max(slowest_batch, 1e-6))))
    single_times = [[] for _ in sessions]
    batch_times = [[] for _ in sessions]
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            single_times[i].append(_time_calls(sess, singles[i], WARMUP // rounds + 1, max(1, repeats // rounds)))
            batch_times[i].append(_time_calls(sess, batch_feeds[i], 1, max(1, batch_repeats // rounds)))
    results = []
    for i in range(len(sessions)):
        s = np.concatenate(single_times[i])
        b = np.concatenate(batch_times[i])
        results.append({
            "latency_ms": {"p50": float(np.percentile(s, 50)), "p95": float(np.percentile(s, 95)), "batch": 1},
            "batch_latency_ms": {"p50": float(np.percentile(b, 50)), "p95": float(np.percentile(b, 95)),
                                 "batch": batch},
            "throughput_per_s": float(batch / (np.percentile(b, 50) / 1000.0)),
            "threads": BENCH_THREADS,
            "repeats": {"batch_1": len(s), "batch": len(b)},
        })
    return results


def io_shapes(path: Path) -> dict:
    """Input and output names, element types and shapes (symbolic dimensions by name)."""
    sess = session(path)

    def describe(args):
        return [{"name": a.name, "type": a.type, "shape": [d if isinstance(d, int) else str(d) for d in a.shape]}
                for a in args]

    return {"inputs": describe(sess.get_inputs()), "outputs": describe(sess.get_outputs())}


def params_by_op(path: Path) -> dict:
    """Parameter count per operator type that uses the weight (Conv, MatMul, Gather, ...)."""
    model = load_model(path)
    shape_types = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)  # shape constants, not weights
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer
             if int(np.prod(t.dims)) > 1 and t.data_type not in shape_types}
    four_bit, block_bookkeeping = _four_bit_weights(model.graph, {t.name: t for t in model.graph.initializer})
    sizes = {name: four_bit[name][0] if name in four_bit else size for name, size in sizes.items()
             if name not in block_bookkeeping}
    counted, out = set(), {}
    for node in model.graph.node:
        for name in node.input:
            if name in sizes and name not in counted and not name.endswith(_BOOKKEEPING_SUFFIXES):
                counted.add(name)
                out[node.op_type] = out.get(node.op_type, 0) + sizes[name]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
