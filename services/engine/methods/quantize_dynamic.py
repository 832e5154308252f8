"""Dynamic int8 quantization with ONNX Runtime's quantizer."""
from services.engine.registry import Method, Param

# ONNX Runtime's dynamic quantizer turns Gemm nodes into MatMul (+ Add) before quantizing, so
# "MatMul" covers every linear layer; a separate "Gemm" choice would do nothing.
OPERATORS = ("MatMul", "Gather", "Conv")
KEPT_AS_4_BIT = "4-bit weights"
# Small blocks: the layers kept out of int8 are the sensitive ones. Measured on MiniLM with its most
# sensitive layer kept: blocks of 16 gave mean/worst fidelity 0.9938/0.9822 at 22.8 MB, blocks of 32
# 0.9935/0.9792 (bench/catalog.py).
KEPT_BLOCK_SIZE = 16


def _weighted_nodes(graph, operators) -> dict[str, str]:
    """Nodes of the chosen kinds that have a constant weight (an initializer), by name -> op type."""
    constants = {t.name for t in graph.initializer}
    return {node.name: node.op_type for node in graph.node
            if node.op_type in (*operators, *(("Gemm",) if "MatMul" in operators else ()))
            and any(name in constants for name in node.input)}


def layer_names(onnx_path) -> list[str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return list(_weighted_nodes(graph, OPERATORS))


def _quantizer_name(name: str, op_type: str) -> str:
    # The quantizer renames a Gemm to <name>_MatMul when it rewrites it; refer to it under that name.
    return f"{name}_MatMul" if op_type == "Gemm" else name


def _kept_linear_layers_in_4_bits(onnx_in, names: list[str], context):
    """The graph with the named linear layers stored as 4-bit weights (MatMulNBits), which compute in
    float: what makes a layer sensitive to int8 is usually its activations (quantized on the fly, one
    scale for a whole tensor with outliers), and 4-bit weights leave those alone at an eighth of the
    float size. The int8 pass that follows does not touch MatMulNBits nodes."""
    from dataclasses import replace

    from services.engine.methods import quantize_int4

    if not names:
        return onnx_in
    out = context.scratch / "kept_in_4_bits.onnx"
    # Its own notes list: the int4 method's sentence ("everything else stays float") is not true here.
    quantize_int4.apply(onnx_in, out, {"block_size": KEPT_BLOCK_SIZE, "symmetric": False, "quantize_embeddings": False,
                                       "keep_float_nodes": [], "only_layers": names}, replace(context, notes=[]))
    return out


def apply(onnx_in, onnx_out, params: dict, context) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from services.engine.methods._quantization import refuse_if_quantized, refuse_unknown_nodes

    graph = onnx.load(str(onnx_in), load_external_data=False).graph
    refuse_if_quantized(graph, context)  # int8 from any quantizer, or 4-bit MatMulNBits
    nodes = {node.name: node.op_type for node in graph.node}
    refuse_unknown_nodes(params["keep_float_nodes"], nodes, context)
    kept = params["keep_float_nodes"]
    source = onnx_in
    four_bit = []
    if kept and params.get("kept_nodes_as", "float") == KEPT_AS_4_BIT:
        four_bit = [name for name in kept if nodes[name] in ("MatMul", "Gemm")]
        source = _kept_linear_layers_in_4_bits(onnx_in, four_bit, context)
    excluded = [_quantizer_name(name, nodes[name]) for name in kept]
    only = [_quantizer_name(name, nodes[name]) for name in params.get("only_layers", []) if name in nodes]
    quantize_dynamic(
        model_input=str(source),
        model_output=str(onnx_out),
        per_channel=params["per_channel"],
        reduce_range=params["reduce_range"],
        weight_type=QuantType.QInt8 if params["weight_type"] == "int8" else QuantType.QUInt8,
        op_types_to_quantize=list(params["operators"]),
        nodes_to_exclude=excluded,
        nodes_to_quantize=only or None,  # a sensitivity scan quantizes one node at a time
    )
    if kept:
        floats = [name for name in kept if name not in four_bit]
        listed = lambda names: f"{', '.join(names[:8])}{' …' if len(names) > 8 else ''}"  # noqa: E731
        written = sum(node.op_type == "MatMulNBits" for node in onnx.load(str(onnx_out), load_external_data=False)
                      .graph.node) if four_bit else 0
        if written:
            context.notes.append(f"quantize.dynamic kept {written} linear layer(s) out of int8 and stored their "
                                 f"weights in 4 bits (blocks of {KEPT_BLOCK_SIZE}, float arithmetic): "
                                 f"{listed(four_bit)}.")
        if four_bit and written < len(four_bit):
            context.notes.append(f"{len(four_bit) - written} of the layers to store in 4 bits had no constant weight "
                                 "the 4-bit quantizer takes (or a scaled, transposed Gemm) and stayed float.")
        if floats:
            context.notes.append(f"quantize.dynamic kept {len(floats)} node(s) in float: {listed(floats)}.")
    quantized = onnx.load(str(onnx_out), load_external_data=False).graph
    if not any(t.name.endswith("_quantized") for t in quantized.initializer):
        present = sorted({op for op in nodes.values() if op in ("MatMul", "Gemm", "Conv", "Gather")})
        raise context.user_error(
            f"No layer was quantized: the chosen operators ({', '.join(params['operators'])}) do not occur in this "
            f"model outside the nodes kept in float. It has: {', '.join(present) or 'no quantizable operators'}.")


METHOD = Method(
    name="quantize.dynamic",
    title="Dynamic int8 quantization",
    explanation=(
        "Stores weights as 8-bit integers instead of 32-bit floats, so the quantized layers take 4x less "
        "space and large matrix multiplications often run faster; accuracy usually drops only slightly."
    ),
    stage="onnx",
    applies_to=("torch", "onnx"),
    quantizes=True,
    params=(
        Param("per_channel", "bool", True,
              "One scale per output channel instead of one per tensor: usually more accurate "
              "(for MatMul weights; ONNX Runtime's dynamic Conv always uses one scale)."),
        Param("reduce_range", "bool", False,
              "Use 7-bit weights, which avoids overflow on some older CPUs at a small cost in accuracy."),
        Param("weight_type", "choice", "int8", "Signed or unsigned 8-bit weights.", choices=("int8", "uint8")),
        # Conv is left out by default: ONNX Runtime's ConvInteger with activations quantized on
        # the fly ran 4-9x slower than float convolutions on the digits CNNs (bench/methods.py).
        Param("operators", "multichoice", ["MatMul", "Gather"],
              "Which kinds of operation to quantize; the others stay in float. MatMul covers linear layers, "
              "Gather covers embedding tables (half of a small transformer). Adding Conv shrinks a CNN further "
              "but usually makes it slower: for convolutions, static quantization is the fast path.",
              choices=OPERATORS),
        Param("keep_float_nodes", "names", [],
              "Names of graph nodes to leave in float (for example a sensitive first or last layer)."),
        Param("kept_nodes_as", "choice", "float",
              "How the linear layers kept out of int8 are stored: in float, or as 4-bit weights that still "
              "compute in float (their activations are not quantized, which is what usually hurts a sensitive "
              "layer) at an eighth of the float size.", choices=("float", KEPT_AS_4_BIT)),
        Param("skip_sensitive", "int", 0,
              "Also keep out of int8 the N nodes that the latest sensitivity scan of this method found most "
              "sensitive (run a scan first).", minimum=0, maximum=1000, step=1),
    ),
    effect_note=("Quantized weights take 4x less space; the file shrinks less when some layers stay float. "
                 "Speed depends on the operators: MatMul gains on large models, Conv usually loses."),
    apply=apply,
    layer_names=layer_names,
    skip_param="keep_float_nodes",
)
