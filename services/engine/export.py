"""Export a PyTorch module to ONNX with the adapter's input names and dynamic axes."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from services.engine.families.base import ModelAdapter


def export_onnx(model: torch.nn.Module, adapter: ModelAdapter, path: Path,
                example_inputs: tuple | None = None) -> Path:
    """`example_inputs` replace the adapter's own tracing inputs (a trimmed vocabulary's token ids)."""
    model.eval()
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    # Shapes read as Python numbers become constants of the graph; the models that do so (token
    # merging) are fed a fixed length by their tokenizer.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    # dynamo=False: the TorchScript exporter handles these models in a fraction of a second,
    # while torch 2.13's dynamo exporter needs onnxscript and failed on a dynamic batch here.
    axes = adapter.dynamic_axes
    if getattr(model, "merge_rate", 1.0) > 1.0:
        # Token merging fixes its token counts for the traced length (64, what the tokenizer pads to):
        # only the batch stays free, so a longer input is refused instead of losing tokens silently.
        axes = {name: {0: dims[0]} for name, dims in axes.items() if 0 in dims}
    with torch.no_grad():
        torch.onnx.export(
            model, example_inputs or adapter.example_inputs(), str(path), dynamo=False, opset_version=17,
            input_names=list(adapter.input_names), output_names=list(adapter.output_names),
            dynamic_axes=axes,
        )
    if len(list(model.named_parameters(remove_duplicate=False))) > len(list(model.named_parameters())):
        _read_shared_weights_directly(path)  # share.layers: one module runs at several places
    return path


def _read_shared_weights_directly(path: Path) -> None:
    """The TorchScript exporter stores a shared weight once but feeds its later users through
    Identity nodes; ONNX Runtime's quantizer sees no constant behind an Identity and left those
    MatMuls in float (a shared MiniLM quantized to 38.7 MB instead of 17.5 MB). Point every user
    at the weight itself."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in outputs}
    if not alias or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in graph.node for a in n.attribute):  # a subgraph may read the alias: leave it
        return
    nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in nodes:
        for index, name in enumerate(node.input):
            node.input[index] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(proto, str(path))
