"""Unstructured magnitude pruning: zero the smallest weights."""
from services.engine.registry import Method, Param


def _layers(model) -> list[tuple[str, object]]:
    import torch

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def layer_names(model) -> list[str]:
    return [name for name, _ in _layers(model)]


def apply(model, params: dict, context) -> None:
    from torch.nn.utils import prune

    named = _layers(model)
    if not named:
        raise context.user_error("This model has no convolution or linear layers to prune.")
    unknown = sorted(set(params.get("skip_layers", [])) - {name for name, _ in named})
    if unknown:
        raise context.user_error(f"There is no layer named {unknown[0]!r} to leave alone; prunable layers include "
                                 f"{', '.join(name for name, _ in named[:6])}.")
    if params.get("only_layers"):  # a sensitivity scan: one layer at a time
        named = [(name, m) for name, m in named if name in params["only_layers"]]
    named = [(name, m) for name, m in named if name not in set(params.get("skip_layers", []))]
    if not named:
        raise context.user_error("Every prunable layer is left alone (skip_layers / skip_sensitive): nothing to prune.")
    layers = [(m, "weight") for _, m in named]
    if params["scope"] == "global":
        # One threshold over all layers: layers with many small weights lose more.
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=params["amount"])
    else:
        for module, name in layers:
            prune.l1_unstructured(module, name=name, amount=params["amount"])
    for module, name in layers:
        prune.remove(module, name)  # bake the zeros into the weight so export sees them
    skipped = len(params.get("skip_layers", []))
    if skipped:
        context.notes.append(f"prune.magnitude left {skipped} layer(s) alone: {', '.join(params['skip_layers'])}.")


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
              minimum=0.0, maximum=0.99, step=0.05, compresses="higher"),
        Param("scope", "choice", "global",
              "'global' ranks all weights together; 'per_layer' removes the same share from every layer.",
              choices=("global", "per_layer")),
        Param("skip_layers", "names", [],
              "Layers (module names, such as features.0) to leave unpruned."),
        Param("skip_sensitive", "int", 0,
              "Also leave alone the N layers that the latest sensitivity scan of this method found most "
              "sensitive (run a scan first).", minimum=0, maximum=1000, step=1),
    ),
    effect_note="Unstructured zeros shrink the zipped size, not the file size or the latency (dense kernels).",
    apply=apply,
    layer_names=layer_names,
    skip_param="skip_layers",
)
