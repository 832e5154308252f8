"""Where a job's training runs: the CPU, or the GPU its recipe asked for (`gpus`).

A recipe with `gpus` is scheduled by the Ray executor on a node with that many GPUs (the task's
`num_gpus`); the runner then checks that PyTorch sees one (`require_gpu`) and trains on it
(`training_on`): distill.train moves the models, its training-only modules and every batch there,
and back to the CPU at the end, so export and measurement stay on the CPU as always.
"""
from __future__ import annotations

from contextlib import contextmanager

_current = "cpu"


def gpus_asked(recipe: dict | None) -> float:
    return float((recipe or {}).get("gpus") or 0)


def require_gpu(where: str) -> str:
    """The device name to train on, or a UserError when PyTorch sees no GPU here."""
    import torch

    from services.errors import UserError

    if not torch.cuda.is_available():
        raise UserError(f"The recipe asks for a GPU (gpus), but PyTorch sees none {where} (torch "
                        f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA): run it on a "
                        f"Ray cluster with a GPU node (EXPLORER_EXECUTOR=ray) whose torch is a CUDA build, or remove "
                        f"'gpus' from the recipe to train on the CPU.")
    return "cuda"


@contextmanager
def training_on(device: str):
    global _current
    previous, _current = _current, device
    try:
        yield
    finally:
        _current = previous


@contextmanager
def moved_to(device, modules: list):
    """The modules on `device` for the duration (everything that trains or is compared there), then back on
    the CPU, where export and measurement happen; nothing moves for the CPU."""
    if device.type == "cpu":
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


def training_device():
    import torch

    return torch.device(_current)


def to_device(value, device):
    """Tensors (in tuples and lists, as a batch holds them) on `device`; anything else unchanged."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value
