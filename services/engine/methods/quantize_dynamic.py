"""Dynamic int8 quantization with ONNX Runtime's quantizer."""
from services.engine.registry import Method, Param

OPERATORS = ("MatMul", "Gemm", "Gather", "Conv")


def apply(onnx_in, onnx_out, params: dict, context) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        model_input=str(onnx_in),
        model_output=str(onnx_out),
        per_channel=params["per_channel"],
        reduce_range=params["reduce_range"],
        weight_type=QuantType.QInt8 if params["weight_type"] == "int8" else QuantType.QUInt8,
        op_types_to_quantize=list(params["operators"]),
        nodes_to_exclude=list(params["keep_float_nodes"]),
    )


METHOD = Method(
    name="quantize.dynamic",
    title="Dynamic int8 quantization",
    explanation=(
        "Stores weights as 8-bit integers instead of 32-bit floats, so the quantized layers take 4x less "
        "space and large matrix multiplications often run faster; accuracy usually drops only slightly."
    ),
    stage="onnx",
    applies_to=("torch", "onnx"),
    params=(
        Param("per_channel", "bool", True,
              "One scale per output channel instead of one per tensor: usually more accurate."),
        Param("reduce_range", "bool", False,
              "Use 7-bit weights, which avoids overflow on some older CPUs at a small cost in accuracy."),
        Param("weight_type", "choice", "int8", "Signed or unsigned 8-bit weights.", choices=("int8", "uint8")),
        # Conv is left out by default: ONNX Runtime's ConvInteger with activations quantized on
        # the fly ran 4-5x slower than float convolutions on the digits CNNs (bench/methods.py).
        Param("operators", "multichoice", ["MatMul", "Gemm", "Gather"],
              "Which kinds of operation to quantize; the others stay in float. Gather covers embedding tables "
              "(half of a small transformer). Adding Conv shrinks a CNN further but usually makes it slower: "
              "for convolutions, static quantization is the fast path.",
              choices=OPERATORS),
        Param("keep_float_nodes", "names", [],
              "Names of graph nodes to leave in float (for example a sensitive first or last layer)."),
    ),
    effect_note=("Quantized weights take 4x less space; the file shrinks less when some layers stay float. "
                 "Speed depends on the operators: MatMul/Gemm gain on large models, Conv usually loses."),
    apply=apply,
)
