"""4-bit weight-only quantization of linear layers (and optionally embeddings) with ONNX Runtime's
MatMulNBits quantizer."""
from services.engine.registry import Method, Param

FLOAT_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16: the weights 4 bits can replace
INT4_OPSET = 21  # the first ONNX opset with 4-bit tensors, which quantized embeddings need


def _separate_shared_gemm_weights(graph) -> None:
    """ONNX Runtime's Gemm-to-MatMul rewrite transposes a Gemm's weight in place; a weight another node
    also reads (a tied embedding) gets a copy of its own first, so that node keeps the original."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    readers: dict = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) > 1 and readers.get(node.input[1], 0) > 1 \
                and node.input[1] in initializers:
            copy = numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[1]]),
                                           f"{node.input[1]}_{node.name}_own")
            graph.initializer.append(copy)
            readers[node.input[1]] -= 1
            node.input[1] = copy.name


def _weight_type(node, initializers):
    """The element type of the constant weight this node would have quantized, or None if it has none."""
    index = 0 if node.op_type == "Gather" else 1
    tensor = initializers.get(node.input[index]) if len(node.input) > index else None
    return None if tensor is None else tensor.data_type


def layer_names(onnx_path) -> list[str]:
    """Nodes a scan can store in 4 bits one at a time: the linear layers (MatMul, Gemm) that read a
    constant float weight, by their names in the original graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name: t for t in graph.initializer}
    return [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm")
            and _weight_type(node, initializers) in FLOAT_TYPES]


def apply(onnx_in, onnx_out, params: dict, context) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    from services.engine.methods._quantization import refuse_if_quantized, refuse_unknown_nodes

    model = onnx.load(str(onnx_in))
    refuse_if_quantized(model.graph, context)
    original_nodes = {node.name: node.op_type for node in model.graph.node}
    refuse_unknown_nodes(params["keep_float_nodes"], original_nodes, context, operators=("MatMul", "Gemm", "Gather"))

    # MatMulNBits replaces MatMul only: a Gemm (how nn.Linear exports on 2-D inputs) becomes MatMul + Add
    # first, named <gemm>_MatMul. Gemms with a scaling or a transposed input stay as they are, in float.
    _separate_shared_gemm_weights(model.graph)
    wrapper = ONNXModel(model)
    wrapper.replace_gemm_with_matmul()
    model = wrapper.model
    renamed = {name: f"{name}_MatMul" for name, op in original_nodes.items() if op == "Gemm"}
    nodes = {node.name: node for node in model.graph.node}
    initializers = {t.name: t for t in model.graph.initializer}
    excluded = {renamed.get(name, name) for name in params["keep_float_nodes"]}
    operators = ("MatMul", "Gather") if params["quantize_embeddings"] else ("MatMul",)
    # Only float weights: a Gather can read a constant table of integer ids, which 4 bits would corrupt.
    quantizable = [name for name, node in nodes.items()
                   if node.op_type in operators and name not in excluded
                   and _weight_type(node, initializers) in FLOAT_TYPES]
    if params.get("only_layers"):  # a sensitivity scan: one layer at a time
        only = {renamed.get(name, name) for name in params["only_layers"]}
        quantizable = [name for name in quantizable if name in only]
    excluded |= {name for name, node in nodes.items() if node.op_type in operators and name not in quantizable}
    if not any(nodes[name].op_type == "MatMul" for name in quantizable):
        ops = sorted({op for op in original_nodes.values() if op in ("MatMul", "Gemm", "Conv", "Gather")})
        raise context.user_error(
            "4-bit weight quantization needs linear layers (MatMul, or Gemm without scaling) with constant "
            f"weights, and this model has none outside the nodes kept in float (it has: {', '.join(ops) or 'none'}). "
            "Use quantize.static or quantize.dynamic for convolutions.")

    if params["quantize_embeddings"] and any(nodes[name].op_type == "Gather" for name in quantizable):
        # The quantizer declares opset 21 for 4-bit tables without converting the graph; ops whose form
        # changed since (ReduceL2's axes in MiniLM's normalisation) would make the file invalid.
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), INT4_OPSET)
        if opset < INT4_OPSET:
            from onnx import version_converter

            try:
                model = version_converter.convert_version(model, INT4_OPSET)
            except Exception as error:
                raise context.user_error(
                    f"Quantizing the embeddings to 4 bits needs ONNX opset {INT4_OPSET}, and this model (opset "
                    f"{opset}) could not be converted ({type(error).__name__}); turn quantize_embeddings off."
                ) from error

    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        quantizer = MatMulNBitsQuantizer(
            model, bits=4, block_size=int(params["block_size"]), is_symmetric=params["symmetric"],
            nodes_to_exclude=sorted(excluded), op_types_to_quantize=operators)
        quantizer.process()
    finally:
        quantizer_log.setLevel(level)
    quantizer.model.save_model_to_file(str(onnx_out))

    done = [node.op_type for node in quantizer.model.model.graph.node]
    left = sorted(name for name, op in original_nodes.items() if op == "Gemm" and name in nodes)  # not rewritten
    note = (f"{done.count('MatMulNBits')} linear layers"
            + (f" and {done.count('GatherBlockQuantized')} embedding tables"
               if params["quantize_embeddings"] else "")
            + f" stored in 4 bits (blocks of {params['block_size']}); everything else stays float.")
    if left:
        note += f" Gemm layers with scaling or a transposed input stayed float: {', '.join(left[:4])}."
    context.notes.append(note)


METHOD = Method(
    name="quantize.int4_weights",
    title="4-bit weight-only quantization",
    explanation=(
        "Stores the weights of linear layers (and optionally embedding tables) in 4 bits with one scale per "
        "small block, so they take about 7x less space; the computation stays in float, so it helps size much "
        "more than speed, and 4 bits cost more accuracy than 8."
    ),
    stage="onnx",
    applies_to=("torch", "onnx"),
    quantizes=True,
    params=(
        Param("block_size", "choice", 32,
              "How many weights share one scale: smaller blocks follow the weights more closely (more accurate), "
              "larger ones store fewer scales (smaller file).", choices=(16, 32, 64, 128)),
        Param("symmetric", "bool", False,
              "Scales only, no zero points: a slightly smaller file, usually slightly less accurate."),
        Param("quantize_embeddings", "bool", False,
              "Also store embedding tables (Gather) in 4 bits: the biggest saving in a small transformer, whose "
              "table is half the model; lookups get a little slower."),
        Param("keep_float_nodes", "names", [],
              "Names of graph nodes to leave in float (for example a sensitive last layer)."),
        Param("skip_sensitive", "int", 0,
              "Also keep in float the N linear layers that the latest sensitivity scan of this method found most "
              "sensitive (run a scan first).", minimum=0, maximum=1000, step=1),
    ),
    effect_note=("Linear-layer weights shrink about 7x (4 bits plus a scale per block); convolutions and, unless "
                 "chosen, embeddings stay float (MiniLM: 86 MB to 52 MB, or 14 MB with embeddings). Speed stays "
                 "about the same (4-bit embeddings: about 6% slower). Fidelity drops more than with int8 (MiniLM: "
                 "cosine 0.97 at block 32, 0.95 at block 128, against 0.99 for dynamic int8)."),
    apply=apply,
    layer_names=layer_names,
    skip_param="keep_float_nodes",
)
