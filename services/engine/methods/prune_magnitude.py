"""Unstructured magnitude pruning: zero the smallest weights."""
from services.engine.registry import Method, Param


def apply(model, params: dict, context) -> None:
    import torch
    from torch.nn.utils import prune

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if not layers:
        raise context.user_error("This model has no convolution or linear layers to prune.")
    if params["scope"] == "global":
        # One threshold over all layers: layers with many small weights lose more.
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=params["amount"])
    else:
        for module, name in layers:
            prune.l1_unstructured(module, name=name, amount=params["amount"])
    for module, name in layers:
        prune.remove(module, name)  # bake the zeros into the weight so export sees them


METHOD = Method(
    name="prune.magnitude",
    title="Magnitude pruning (unstructured)",
    explanation=(
        "Sets the smallest weights to zero; the file compresses much better when zipped, "
        "but the model does not run faster on ordinary hardware, and too much pruning costs accuracy."
    ),
    stage="torch",
    applies_to=("torch",),
    params=(
        Param("amount", "float", 0.5, "Share of weights set to zero (0.5 = half of them).",
              minimum=0.0, maximum=0.99, step=0.05),
        Param("scope", "choice", "global",
              "'global' ranks all weights together; 'per_layer' removes the same share from every layer.",
              choices=("global", "per_layer")),
    ),
    effect_note="Unstructured zeros shrink the zipped size, not the file size or the latency (dense kernels).",
    apply=apply,
)
