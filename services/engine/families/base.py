"""What the engine needs to know about a built-in model: how to make it, load it and export it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

Progress = Callable[[float, str], None]


class ModelAdapter:
    """One built-in model. Subclasses set the class attributes and implement `create` and `build`."""

    model_id: str = ""
    # What the model's first output is, for scoring fidelity: 'logits' (top-1 agreement over the
    # last axis) or 'embedding' (cosine similarity of rows).
    output_kind: str = "logits"
    input_names: tuple = ("input",)
    output_names: tuple = ("output",)
    dynamic_axes: dict = {"input": {0: "batch"}, "output": {0: "batch"}}

    def create(self, progress: Progress) -> torch.nn.Module:
        """The original fp32 model, trained or loaded from a package (the 'prepare' job)."""
        raise NotImplementedError

    def build(self) -> torch.nn.Module:
        """The architecture, untrained, ready for `load_state_dict`."""
        raise NotImplementedError

    def example_inputs(self) -> tuple:
        """Inputs for tracing the ONNX export (batch first)."""
        raise NotImplementedError

    def save(self, net: torch.nn.Module, path: Path) -> None:
        torch.save(net.state_dict(), path)

    def load(self, path: Path) -> torch.nn.Module:
        net = self.build()
        # weights_only=True: loading never runs code from the file.
        net.load_state_dict(torch.load(path, weights_only=True))
        net.eval()
        return net
