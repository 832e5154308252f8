"""The registry of built-in models (adapters), by id. A new family = a module in families/."""
from __future__ import annotations

import torch

from services.engine.families import digits
from services.engine.families.base import ModelAdapter

ADAPTERS: dict[str, ModelAdapter] = {a.model_id: a for a in digits.ADAPTERS}


def _register_optional() -> None:
    # Families whose modules need extra packages register themselves when those import.
    for module_name in ("services.engine.families.minilm", "services.engine.families.speech"):
        try:
            module = __import__(module_name, fromlist=["ADAPTERS"])
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("services.engine.families"):
                continue  # not written yet
            raise
        ADAPTERS.update({a.model_id: a for a in module.ADAPTERS})


_register_optional()


def get_adapter(model_id: str) -> ModelAdapter:
    return ADAPTERS[model_id]


def build(model_id: str) -> torch.nn.Module:
    return get_adapter(model_id).build()


def input_example(model_id: str) -> tuple:
    return get_adapter(model_id).example_inputs()
