"""Structured pruning: remove whole convolution channels, hidden neurons and attention heads, so the
layers themselves get narrower (smaller weight matrices, fewer operations) rather than filled with zeros.

Torch-Pruning's dependency graph finds what must shrink together (a channel removed from one layer
is an input removed from the next; a head removed from the query is removed from the key, the value
and the output projection too).

- Convolutional networks: Torch-Pruning's MetaPruner removes the same share of every layer's output
  channels / neurons, except the final layer (its outputs are the classes). The input channels are
  never touched: nothing before them could shrink with them.
- Transformers (BERT-style encoders and the speech encoder): in every layer, the same number of whole
  attention heads and of feed-forward neurons go. The hidden width (the residual stream that every
  layer, the embedding and the output share) is kept, so the model's inputs and outputs are unchanged.

What goes is ranked by what each channel contributes on the task's fitting samples (or by weight
norms alone), and the layers that read the removed channels are refitted by least squares on the
same samples, so that the kept channels take over what the removed ones carried.
"""
from __future__ import annotations

from services.engine.methods._channel_statistics import Ranking
from services.engine.registry import Method, Param

TARGETS = ("all", "neurons", "heads")


def apply(model, params: dict, context) -> None:
    import torch

    blocks = _transformer_blocks(model)
    if not blocks and context.architecture not in ("cnn", ""):
        kind = _model_type(model)
        raise context.user_error(
            "Structured pruning finds attention heads and feed-forward layers in BERT-style encoders (BERT, "
            "RoBERTa, MiniLM, ELECTRA...) and in the built-in speech encoder; "
            f"{'this ' + kind + ' model' if kind else 'this model'} is laid out differently, or an earlier step "
            "of the recipe replaced those layers (put structured pruning first). Magnitude pruning and "
            "quantization work on any layout.")
    if not blocks and params["target"] == "heads":
        raise context.user_error("This convolutional network has no attention heads; choose 'all' or 'neurons' "
                                 "as what structured pruning removes.")
    before = _count(model)
    example_inputs = tuple(context.adapter.example_inputs())
    if blocks:
        what = _prune_transformer(model, blocks, params, example_inputs, context)
    else:
        what = _prune_cnn(model, params, example_inputs, context)
    with torch.no_grad():  # a pruned model that no longer runs must fail here, with its reason, not at export
        model.eval()(*example_inputs)
    context.notes.append(
        f"Structured pruning removed {what}: {_amount(before)} -> {_amount(_count(model))} parameters. After heavy "
        "structured pruning, accuracy usually needs recovery training (distillation from the original model).")


# ---- convolutional networks ---------------------------------------------------------------------

def _prune_cnn(model, params: dict, example_inputs: tuple, context) -> str:
    import torch
    import torch_pruning as tp

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if len(layers) < 2:
        raise context.user_error("This model has fewer than two convolution or linear layers, so there are no "
                                 "inner channels or neurons that structured pruning could remove.")
    widths = {name: _width(m) for name, m in model.named_modules() if m in layers}
    ranking = Ranking(params, model, context, readers=layers[1:])
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=ranking.importance,
        pruning_ratio=params["amount"], round_to=params["round_to"] if params["round_to"] > 1 else None,
        # The last layer produces the class scores: removing one of its outputs would remove a class.
        ignored_layers=[layers[-1]],
    )
    for group in pruner.step(interactive=True):
        ranking.prune(group)
    changed = [f"{name} {widths[name]} -> {_width(m)}" for name, m in model.named_modules()
               if name in widths and _width(m) != widths[name]]
    if not changed:
        raise context.user_error(f"Removing {params['amount']:.0%} of the channels leaves every layer as it was "
                                 "(the layers are too narrow for that share); choose a larger amount.")
    return "channels and neurons (" + ", ".join(changed) + ")"


def _width(module) -> int:
    return module.out_channels if hasattr(module, "out_channels") else module.out_features


# ---- transformers -------------------------------------------------------------------------------

class _Block:
    """One transformer layer, as far as structured pruning cares: the attention's four projections
    (with the attribute that holds its head count) and the feed-forward pair."""

    def __init__(self, name, attention, heads_attribute, query, key, value, out, ffn_in, ffn_out):
        self.name, self.attention, self.heads_attribute = name, attention, heads_attribute
        self.query, self.key, self.value, self.out = query, key, value, out
        self.ffn_in, self.ffn_out = ffn_in, ffn_out

    @property
    def heads(self) -> int:
        return int(getattr(self.attention, self.heads_attribute))

    def set_heads(self, heads: int) -> None:
        setattr(self.attention, self.heads_attribute, heads)
        if hasattr(self.attention, "all_head_size"):  # BERT's self-attention keeps both
            self.attention.all_head_size = self.query.out_features


def _transformer_blocks(model) -> list[_Block]:
    from torch import nn

    from services.engine.speech.model import EncoderLayer

    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, EncoderLayer):  # the built-in speech encoder
            a = module.attention
            blocks.append(_Block(name, a, "heads", a.query, a.key, a.value, a.out, module.ff_in, module.ff_out))
            continue
        # BERT's layer: attention.self.{query,key,value}, attention.output.dense, intermediate.dense, output.dense
        attention = getattr(getattr(module, "attention", None), "self", None)
        projections = [getattr(attention, n, None) for n in ("query", "key", "value")]
        out = getattr(getattr(getattr(module, "attention", None), "output", None), "dense", None)
        ffn_in = getattr(getattr(module, "intermediate", None), "dense", None)
        ffn_out = getattr(getattr(module, "output", None), "dense", None)
        linears = [*projections, out, ffn_in, ffn_out]
        if all(isinstance(m, nn.Linear) for m in linears) and hasattr(attention, "num_attention_heads"):
            blocks.append(_Block(name, attention, "num_attention_heads", *projections, out, ffn_in, ffn_out))
    return blocks


def _prune_transformer(model, blocks: list[_Block], params: dict, example_inputs: tuple, context) -> str:
    import torch_pruning as tp

    amount, target = params["amount"], params["target"]
    ranking = Ranking(params, model, context, readers=[layer for b in blocks for layer in (b.out, b.ffn_out)])
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    heads_before = [b.heads for b in blocks]
    neurons_before = [b.ffn_in.out_features for b in blocks]
    for index, block in enumerate(blocks):
        context.progress(0.3 + 0.25 * index / len(blocks), f"structured pruning: layer {index + 1}/{len(blocks)}")
        if target in ("all", "heads"):
            _remove_heads(graph, block, amount, ranking, context)
        if target in ("all", "neurons"):
            _remove_neurons(graph, block, amount, params["round_to"], ranking, context)

    parts = []
    if target in ("all", "heads"):
        parts.append(_describe("attention heads", heads_before, [b.heads for b in blocks]))
    if target in ("all", "neurons"):
        parts.append(_describe("feed-forward neurons", neurons_before, [b.ffn_in.out_features for b in blocks]))
    if all(part is None for part in parts):
        raise context.user_error(f"Removing {amount:.0%} leaves every layer as it was (too few heads or neurons "
                                 "for that share); choose a larger amount.")
    return " and ".join(p for p in parts if p) + f" in each of the {len(blocks)} layers"


def _full_group(graph, linear, expected: set, context):
    """The group of every output channel of `linear`, checked to touch exactly the layers we expect:
    a group that reached anything else (the hidden width, the embedding) would change the model's shape."""
    import torch_pruning as tp
    from torch import nn

    group = graph.get_pruning_group(linear, tp.prune_linear_out_channels, list(range(linear.out_features)))
    touched = {dep.target.module for dep, _ in group
               if not isinstance(dep.target.module, nn.Module)
               or next(dep.target.module.parameters(recurse=False), None) is not None}
    if touched != expected:
        raise context.user_error("Structured pruning could not trace this model's attention and feed-forward "
                                 "layers as separate units (they are tied to other layers), so it removed nothing.")
    return group


def _remove_heads(graph, block: _Block, amount: float, ranking: "Ranking", context) -> None:
    import torch_pruning as tp

    heads = block.heads
    remove = min(heads - 1, int(amount * heads + 0.5))  # a layer keeps at least one head
    if remove <= 0:
        return
    expected = {block.query, block.key, block.value, block.out}
    group = _full_group(graph, block.query, expected, context)
    head_size = block.query.out_features // heads
    # A head's importance: the mean of its channels' (a channel of the query, key, value and output at once).
    scores = ranking.importance(group).view(heads, head_size).mean(1)
    dropped = sorted(scores.argsort()[:remove].tolist())
    channels = [head * head_size + offset for head in dropped for offset in range(head_size)]
    ranking.prune(graph.get_pruning_group(block.query, tp.prune_linear_out_channels, channels))
    block.set_heads(heads - remove)


def _remove_neurons(graph, block: _Block, amount: float, round_to: int, ranking: "Ranking", context) -> None:
    import torch_pruning as tp

    neurons = block.ffn_in.out_features
    keep = neurons - int(amount * neurons)
    keep = max(round_to, keep - keep % round_to) if round_to > 1 else max(1, keep)
    if keep >= neurons:
        return
    group = _full_group(graph, block.ffn_in, {block.ffn_in, block.ffn_out}, context)
    dropped = ranking.importance(group).argsort()[:neurons - keep].tolist()
    ranking.prune(graph.get_pruning_group(block.ffn_in, tp.prune_linear_out_channels, sorted(dropped)))


def _describe(what: str, before: list[int], after: list[int]) -> str | None:
    if before == after:
        return None
    if len(set(before)) == 1 and len(set(after)) == 1:
        return f"{before[0] - after[0]} of {before[0]} {what}"
    return f"{sum(before) - sum(after)} of {sum(before)} {what} in all"


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _amount(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count:,}"


def _model_type(model) -> str | None:
    """The Hugging Face model type of an upload (the encoder inside the pooling wrapper), if any."""
    for module in model.modules():
        kind = getattr(getattr(module, "config", None), "model_type", None)
        if kind:
            return kind
    return None


METHOD = Method(
    name="prune.structured",
    title="Structured pruning (channels, neurons, heads)",
    explanation=(
        "Removes whole channels, neurons and attention heads that matter least, so the model really gets "
        "smaller and faster on any hardware; it costs more accuracy than zeroing single weights, and heavy "
        "pruning usually needs recovery training afterwards."
    ),
    stage="torch",
    applies_to=("torch",),
    params=(
        Param("amount", "float", 0.5,
              "Share of each layer's channels, neurons and attention heads removed (0.5 = half of them).",
              minimum=0.05, maximum=0.95, step=0.05, compresses="higher"),
        Param("target", "choice", "all",
              "What is removed: 'all' (every kind the model has), 'neurons' (convolution channels, hidden and "
              "feed-forward neurons only) or 'heads' (whole attention heads only, transformers).",
              choices=TARGETS),
        Param("importance", "choice", "contribution",
              "How the least important are found: 'contribution' runs the model on 128 of the task's fitting "
              "samples and ranks each one by what it adds to the next layer (its mean activation times the weights "
              "that read it); 'l2' and 'l1' rank by the norm of its weights alone.",
              choices=("contribution", "l2", "l1")),
        Param("refit", "bool", True,
              "Refit the layers that read what was removed, by least squares on 128 of the task's fitting samples, "
              "so the kept channels take over what the removed ones carried (a few seconds; keeps much more of the "
              "score). Off: the remaining weights are left exactly as they were."),
        Param("round_to", "int", 1,
              "Keep each layer's channel or neuron count a multiple of this (8 or 16 suits fast kernels); "
              "1 keeps the exact share. Head counts are not rounded.",
              minimum=1, maximum=64, step=1),
    ),
    architectures=("cnn", "text-transformer", "speech-transformer"),
    effect_note=("Fewer, narrower layers: the file, the parameter count and the latency all shrink with the "
                 "amount (the embedding table and the hidden width are kept); the score drops faster than "
                 "with unstructured pruning at the same amount."),
    apply=apply,
)
