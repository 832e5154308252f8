"""ALBERT's cross-layer sharing: each group of consecutive transformer layers becomes one layer
object that the model runs once per position of the group, so its weights are stored once."""
from services.engine.registry import Method, Param


def layer_stack(net):
    """(owner, attribute name, ModuleList): the model's stack of identical layers, or None.

    The largest ModuleList of at least two modules of one class with parameters of identical
    shapes: encoder.layer in BERT-like models, layers in the speech encoder."""
    import torch

    best, best_size = None, 0
    for owner in net.modules():
        for name, child in owner.named_children():
            if not isinstance(child, torch.nn.ModuleList) or len(child) < 2:
                continue
            kinds = {type(layer) for layer in child}
            shapes = {tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in child}
            size = sum(p.numel() for p in child.parameters())
            if len(kinds) == 1 and len(shapes) == 1 and size > best_size:
                best, best_size = (owner, name, child), size
    return best


def apply(net, params: dict, context) -> None:
    import torch

    found = layer_stack(net)
    if found is None:
        raise context.user_error("This model has no stack of identical layers to share; share.layers works on "
                                 "transformer encoders (BERT-like models, the speech encoder).")
    owner, name, layers = found
    count, size = len(layers), params["group_size"]
    if len({id(layer) for layer in layers}) < count:
        raise context.user_error("The layers of this model are already shared; remove the second share.layers step.")
    if size > count:
        raise context.user_error(f"group_size is {size}, but the model has only {count} layers; choose 2 to {count}.")
    groups = [list(layers[start:start + size]) for start in range(0, count, size)]
    context.progress(0.35, f"sharing {count} layers in {len(groups)} groups of up to {size}")
    shared = []
    with torch.no_grad():
        for group in groups:
            keeper = group[0]
            if params["init"] == "average" and len(group) > 1:
                # Every layer of the group is replaced by one; the mean is the single set of weights
                # closest (in squared distance) to all of them.
                members = [dict(layer.named_parameters()) for layer in group]
                for parameter_name, parameter in keeper.named_parameters():
                    parameter.copy_(torch.stack([m[parameter_name] for m in members]).mean(0))
            shared.extend([keeper] * len(group))
    # The same module object at several positions: named_parameters and the ONNX exporter see each
    # weight once, so the file shrinks by the layers removed.
    setattr(owner, name, torch.nn.ModuleList(shared))
    per_layer = sum(p.numel() for p in layers[0].parameters())
    removed = (count - len(groups)) * per_layer
    sets = f"{len(groups)} set{'s' if len(groups) > 1 else ''} of weights"
    start = "the average of each group" if params["init"] == "average" else "the first layer of each group"
    context.notes.append(
        f"{count} layers now share {sets} (groups of {size}, started from {start}): "
        f"{removed:,} fewer parameters. Without retraining the output moves far from the original; "
        f"recover with distillation.")


METHOD = Method(
    name="share.layers",
    title="Cross-layer sharing (ALBERT)",
    explanation=(
        "Makes groups of neighbouring layers use one set of weights (as ALBERT does), so the file holds "
        "fewer layers while the model still runs as many; it does not run faster, and without retraining "
        "the model's output changes a lot."
    ),
    stage="torch",
    applies_to=("torch",),
    architectures=("text-transformer", "speech-transformer"),
    params=(
        Param("group_size", "int", 2,
              "How many consecutive layers share one set of weights (2 = pairs; the model's layer count = all "
              "layers share one).", minimum=2, maximum=48, step=1),
        # "first" kept more of MiniLM's output than "average" at groups of 2 and 3 (cosine 0.36 vs
        # 0.21 and 0.21 vs 0.15 on fitting paragraphs): an averaged layer matches none of its members.
        Param("init", "choice", "first",
              "The shared weights start as the group's first layer (closer to the original on MiniLM) or as the "
              "average of the group's layers.",
              choices=("first", "average")),
    ),
    effect_note=("Parameters and file size fall by the layers removed (MiniLM, groups of 2: 90 MB → 69 MB); "
                 "latency stays the same (every layer still runs); fidelity drops sharply without retraining: "
                 "recover with distillation."),
    apply=apply,
)
