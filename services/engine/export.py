"""Export a PyTorch module to ONNX with a dynamic batch dimension."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    model.eval()
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    # dynamo=False: the TorchScript exporter handles these models in a fraction of a second,
    # while torch 2.13's dynamo exporter needs onnxscript and failed on a dynamic batch here.
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    return path
