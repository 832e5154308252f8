"""Static int8 quantization (QDQ) with ONNX Runtime, calibrated on samples of the task's fitting split."""
from services.engine.methods._quantization import refuse_if_quantized, refuse_unknown_nodes
from services.engine.registry import Method, Param
from services.engine.selection import STRATEGIES  # numpy only: the web process may import it

# The operators with weights a user may choose. Gemm stays Gemm here (ONNX Runtime runs it as QGemm).
OPERATORS = ("Conv", "MatMul", "Gemm", "Gather")
# Operators that only move, pool or clip values. ONNX Runtime quantizes them only when their input is
# already quantized, so int8 then flows from one quantized layer to the next without a
# dequantize/quantize pair in between (digits-cnn-x4 at batch 256: 3.4x faster with them, 1.8x
# without). ONNX Runtime's own default list also has Where, which in a transformer meets the
# attention mask's -3.4e38 fill: the histogram calibrators crash on it and MinMax ruins the ranges.
PASS_THROUGH = ("Relu", "Clip", "MaxPool", "AveragePool", "Flatten", "Reshape", "Transpose", "Squeeze",
                "Unsqueeze", "Slice", "Split", "Pad", "Resize")
CALIBRATION_BATCH = 16  # samples per calibration run: the ranges are the same, the runs fewer
# ONNX Runtime's Entropy calibrator defaults to 128 histogram bins for 128 quantized bins, which
# leaves a single candidate threshold (the full range): the same ranges as MinMax. 512 bins let it
# search clipping thresholds at a quarter of the time of the classic 2048 (MiniLM: 56 s vs 159 s).
ENTROPY_BINS = 512


class FitSetReader:
    """Feeds ONNX Runtime's calibrator `count` samples of the fitting split, spread evenly over it
    (a split stored in topic order would otherwise be calibrated on its first topics only), or the
    samples `indices` names (chosen by calibration_selection).
    The calibrators only call get_next(): None ends the data."""

    def __init__(self, inputs: dict, count: int, batch: int = CALIBRATION_BATCH, indices=None):
        import hashlib

        import numpy as np

        total = len(next(iter(inputs.values())))
        if indices is None:
            indices = np.linspace(0, total - 1, min(count, total)).round().astype(int)
        self.indices = np.unique(indices)
        chosen = {name: values[self.indices] for name, values in inputs.items()}
        digest = hashlib.sha1()
        for name in sorted(chosen):
            digest.update(np.ascontiguousarray(chosen[name]).tobytes())
        self.digest = digest.hexdigest()[:16]  # which samples: a cache of ranges is valid for these only
        self._feeds = iter([{name: values[start:start + batch] for name, values in chosen.items()}
                            for start in range(0, len(self.indices), batch)])

    def get_next(self):
        return next(self._feeds, None)


def _pre_process(onnx_in, scratch, keep_float_nodes):
    """ONNX Runtime's recommended step before quantizing (basic graph optimizations and shape
    inference), or the model as it is when it fails or would drop a node the user named.
    Symbolic shape inference is skipped: it fails on our BERT export and then writes a copy of the
    whole model into the current directory; ONNX shape inference is enough for QDQ here."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = scratch / "static_pre_processed.onnx"
    try:
        quant_pre_process(str(onnx_in), str(target), skip_symbolic_shape=True)
    except Exception:  # a graph ONNX Runtime cannot optimize is still quantized, unoptimized
        return onnx_in
    kept = {node.name for node in onnx.load(str(target), load_external_data=False).graph.node}
    return target if set(keep_float_nodes) <= kept else onnx_in


def _nothing_quantized(params: dict, nodes: dict) -> str:
    present = sorted({op for op in nodes.values() if op in OPERATORS})
    return (f"No layer was quantized: the chosen operators ({', '.join(params['operators'])}) do not occur with "
            f"weights in this model outside the nodes kept in float. It has: "
            f"{', '.join(present) or 'no quantizable operators'}.")


def _calibrate(source, operators, method: str, options: dict, reader, cache, context) -> None:
    """Measure every activation's range on the reader's samples and write them to `cache`."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    try:
        calibrator = create_calibrator(source, operators,
                                       augmented_model_path=str(context.scratch / "static_augmented.onnx"),
                                       calibrate_method=getattr(CalibrationMethod, method), extra_options=options)
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)
    except (ValueError, RuntimeError) as error:
        raise context.user_error(_calibration_failure(error, method)) from error


def _calibration_failure(error: Exception, method: str) -> str:
    if "bins" in str(error):  # numpy's histogram on a tensor with an extreme range (a -3.4e38 mask fill)
        return (f"{method} calibration failed: some values in this model span too wide a range for a histogram. "
                f"Use MinMax calibration, or keep the layers that produce them in float.")
    return f"Calibration failed in ONNX Runtime ({type(error).__name__}: {str(error).splitlines()[0][:200]})."


def _selected_samples(onnx_in, fit, params: dict, context):
    """(indices, how) of the calibration samples for calibration_selection; (None, '') for 'random',
    which keeps the samples spread evenly over the split (as good as a random draw, and reproducible).
    Ranked on the step's input model with ONNX Runtime, grouped by the original model's outputs as
    recovery's label budget is (services/engine/selection.py). Inconsistency on a one-headed model
    compares it with the original's ONNX file; before any earlier step changed the model the two
    answer alike, and it ranks by uncertainty instead (the note says so)."""
    from pathlib import Path

    from services.engine import selection

    strategy = params["calibration_selection"]
    if strategy == "random":
        return None, ""
    if getattr(context.adapter, "output_kind", "logits") != "logits":
        raise context.user_error(f"Calibration selection '{strategy}' ranks samples by the model's class scores, and "
                                 "this model outputs embeddings; use 'random'.")
    total = len(next(iter(fit.inputs.values())))
    count = min(params["calibration_samples"], total)
    context.progress(0.1, f"ranking {total} samples by {strategy} to choose {count} for calibration")
    outputs = selection.onnx_outputs(onnx_in, fit.inputs)
    coupling = getattr(context.adapter, "coupling", None)
    original = _original_onnx(context)
    if original is None and strategy == "inconsistency" and (coupling is None or len(outputs) < 2):
        raise context.user_error("Calibration selection 'inconsistency' compares this model with the original, "
                                 "whose ONNX file is not available here; use 'uncertainty' or 'random'.")
    same = original is not None and Path(original).resolve() == Path(onnx_in).resolve()
    original_outputs = None if original is None else outputs if same else selection.onnx_outputs(original, fit.inputs)
    return selection.choose_from_outputs(strategy, count, outputs, original_outputs, coupling, seed=0)


def _original_onnx(context):
    """The original model's exported ONNX file (the model row's artifact), or None."""
    from pathlib import Path

    artifact, home = (context.model or {}).get("artifact"), context.home
    if not artifact or home is None:
        return None
    path = Path(home) / artifact
    return path if path.is_file() else None


def layer_names(onnx_path) -> list[str]:
    """Nodes a sensitivity scan can quantize one at a time: the layers with a constant weight."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type in OPERATORS and any(name in constants for name in node.input)]


def apply(onnx_in, onnx_out, params: dict, context) -> None:
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(onnx_in), load_external_data=False).graph
    refuse_if_quantized(graph, context)
    if params["activation_type"] == "int8" and params["weight_type"] == "uint8":
        raise context.user_error("ONNX Runtime cannot combine int8 activations with uint8 weights; choose int8 "
                                 "weights, or uint8 activations.")
    nodes = {node.name: node.op_type for node in graph.node}
    refuse_unknown_nodes(params["keep_float_nodes"], nodes, context)
    kept = set(params["keep_float_nodes"])
    if not any(op in params["operators"] and name not in kept for name, op in nodes.items()):
        # refused before a calibration pass that would be for nothing
        raise context.user_error(_nothing_quantized(params, nodes))

    only = [name for name in params.get("only_layers", []) if name in nodes]  # a sensitivity scan
    fit = context.fit_set()
    indices, how = _selected_samples(onnx_in, fit, params, context)
    reader = FitSetReader(fit.inputs, params["calibration_samples"], indices=indices)
    source = _pre_process(onnx_in, context.scratch, [*params["keep_float_nodes"], *only])
    operators = list(params["operators"]) + list(PASS_THROUGH)
    method = params["calibrate_method"]
    context.progress(0.35, f"calibrating on {len(reader.indices)} samples ({method})")
    # Percentile's calibrator defaults to a range symmetric around zero, which wastes half of the uint8
    # range on every ReLU output; like MinMax and Entropy, it clips each side on its own here.
    calibrator_options = {"MinMax": {},
                          "Entropy": {"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
                          "Percentile": {"percentile": params["percentile"], "symmetric": False}}[method]
    # The ranges are computed here and handed to quantize_static as its calibration cache, because
    # quantize_static does not pass the histogram size through to the Entropy calibrator.
    # A scan quantizes one layer at a time with the same setting: it calibrates once and reuses the ranges.
    graph_name = Path(source).stem  # the pre-processed graph or, when that failed, the original: other tensors
    cache = context.scratch / f"static_calibration_{graph_name}_{method}_{params['percentile']:g}_{reader.digest}.json"
    if not cache.is_file():
        _calibrate(source, operators, method, calibrator_options, reader, cache, context)

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    quantize_static(
        model_input=str(source),
        model_output=str(onnx_out),
        calibration_data_reader=None,
        calibration_cache_path=str(cache),
        calibrate_method=getattr(CalibrationMethod, method),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=operators,
        per_channel=params["per_channel"],
        reduce_range=params["reduce_range"],
        activation_type=types[params["activation_type"]],
        weight_type=types[params["weight_type"]],
        nodes_to_exclude=list(params["keep_float_nodes"]),
        nodes_to_quantize=only or None,
    )
    quantized = onnx.load(str(onnx_out), load_external_data=False).graph
    if not any(t.name.endswith("_quantized") for t in quantized.initializer):  # e.g. only MatMuls without weights
        raise context.user_error(_nothing_quantized(params, nodes))

    note = (f"Activation ranges calibrated ({method}) on {len(reader.indices)} samples of "
            f"{fit.extra.get('data', 'the fitting split')}{'; ' + how if how else ''}.")
    if fit.extra.get("overlaps_scoring"):
        note += (" These samples are also the ones the score is computed on (the data set has no separate "
                 "split), so the score may flatter the quantized model slightly.")
    context.notes.append(note)


METHOD = Method(
    name="quantize.static",
    title="Static int8 quantization (calibrated)",
    explanation=(
        "Stores weights and the values passed between layers as 8-bit integers, with ranges measured "
        "beforehand on sample inputs, so convolutions and linear layers run in int8 end to end: often the "
        "fastest int8 option for CNNs; costs a calibration pass and some accuracy where values have outliers."
    ),
    stage="onnx",
    applies_to=("torch", "onnx"),
    quantizes=True,
    params=(
        Param("calibration_samples", "int", 128,
              "How many samples of the fitting split to measure the value ranges on (spread evenly over it). "
              "More samples give steadier ranges and take longer.", minimum=8, maximum=2048, step=8),
        Param("calibration_selection", "choice", "random",
              "Which samples of the fitting split to calibrate on: random (spread evenly over it, no preference), "
              "uncertainty (those the model is least sure about), or inconsistency (where its two linked heads "
              "disagree, or where it disagrees with the original model). Ranking runs the model once over the split.",
              choices=STRATEGIES),
        Param("calibrate_method", "choice", "MinMax",
              "How a range is chosen from the measured values: MinMax keeps every value; Entropy and "
              "Percentile clip rare extremes to resolve common values better (slower to calibrate).",
              choices=("MinMax", "Entropy", "Percentile")),
        Param("percentile", "float", 99.999,
              "With Percentile calibration: the share of values (in %) the range must cover.",
              minimum=99.0, maximum=100.0, step=0.001),
        Param("per_channel", "bool", True,
              "One weight scale per output channel instead of one per tensor: usually more accurate."),
        Param("reduce_range", "bool", False,
              "Use 7-bit weights, which avoids overflow on CPUs without VNNI instructions at a small cost "
              "in accuracy."),
        Param("activation_type", "choice", "uint8",
              "Type of the values passed between layers: uint8 is ONNX Runtime's choice for x86 CPUs, "
              "int8 for ARM and GPUs.", choices=("uint8", "int8")),
        Param("weight_type", "choice", "int8", "Signed or unsigned 8-bit weights.", choices=("int8", "uint8")),
        Param("operators", "multichoice", list(OPERATORS),
              "Which kinds of layer to quantize; the others stay in float. Conv: convolutions; MatMul and Gemm: "
              "linear layers; Gather: embedding tables. Pooling, reshaping and ReLU between them follow along.",
              choices=OPERATORS),
        Param("keep_float_nodes", "names", [],
              "Names of graph nodes to leave in float (for example a sensitive first or last layer, or in a "
              "transformer the feed-forward output layers, whose inputs have outliers)."),
        Param("skip_sensitive", "int", 0,
              "Also keep in float the N layers that the latest sensitivity scan of this method found most "
              "sensitive (run a scan first).", minimum=0, maximum=1000, step=1),
    ),
    effect_note=("Weights take 4x less space. CNNs get faster (digits-cnn-x4: about 2.2x at batch 1 and at batch "
                 "256, where dynamic int8 with Conv was 5-7x slower). Transformers lose more accuracy than with "
                 "dynamic quantization and gain less speed (MiniLM: cosine 0.94 vs 0.99, 1.5x vs 1.9x faster at "
                 "batch 32), because one fixed range cannot fit the outliers after GELU; keeping the feed-forward "
                 "output layers in float brings MiniLM back to 0.99 at 32 MB and 1.2x."),
    apply=apply,
    layer_names=layer_names,
    skip_param="keep_float_nodes",
)
