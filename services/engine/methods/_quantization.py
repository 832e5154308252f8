"""What the quantization methods share: recognising a graph that is already quantized, and refusing
node names the graph does not have. (A module starting with `_` is not registered as a method.)"""

# Operators that only occur in a graph that is already quantized.
QUANTIZED_OPERATORS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                       "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
                       "MatMulIntegerToFloat", "QAttention", "MatMulNBits", "GatherBlockQuantized",
                       "MatMulBnb4"}


def already_quantized(graph) -> bool:
    """True for a graph any of ONNX Runtime's quantizers (or another tool) has already quantized."""
    return (any(node.op_type in QUANTIZED_OPERATORS for node in graph.node)
            or any(t.name.endswith("_quantized") for t in graph.initializer))


def refuse_if_quantized(graph, context) -> None:
    if already_quantized(graph):
        raise context.user_error("This model is already quantized; quantizing it again changes nothing useful. "
                                 "Remove the second quantization step, or start from a float model.")


def refuse_unknown_nodes(names, nodes: dict, context, operators=("MatMul", "Gemm", "Conv", "Gather")) -> None:
    """A clear refusal for a node name the graph does not have, with real names to copy."""
    for name in names:
        if name not in nodes:
            candidates = [n for n, op in nodes.items() if op in operators][:6]
            raise context.user_error(f"There is no node named {name!r} in this model; quantizable nodes include "
                                     f"{', '.join(candidates) or 'none'}.")
