"""Export a PyTorch module to ONNX with the adapter's input names and dynamic axes."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from services.engine.families.base import ModelAdapter


def export_onnx(model: torch.nn.Module, adapter: ModelAdapter, path: Path) -> Path:
    model.eval()
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
    # dynamo=False: the TorchScript exporter handles these models in a fraction of a second,
    # while torch 2.13's dynamo exporter needs onnxscript and failed on a dynamic batch here.
    with torch.no_grad():
        torch.onnx.export(
            model, adapter.example_inputs(), str(path), dynamo=False, opset_version=17,
            input_names=list(adapter.input_names), output_names=list(adapter.output_names),
            dynamic_axes=adapter.dynamic_axes,
        )
    return path
