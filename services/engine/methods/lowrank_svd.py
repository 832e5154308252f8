"""Low-rank factorization: replace a weight matrix by the product of two thin ones (truncated SVD).

A Linear(in, out) becomes Linear(in, r, bias=False) -> Linear(r, out); a Conv(in, out, k x k)
becomes Conv(in, r, k x k, bias=False) -> Conv(r, out, 1 x 1) (the standard spatial-then-pointwise
split). The singular values are shared between the two factors (sqrt(S) on each side) so neither
factor carries all the scale, which keeps a later quantizer's ranges balanced.

A layer is factorized only when it gets smaller: r * (in + out) < in * out (for a convolution,
in * k * k takes the place of in). For a square layer the break-even rank is half its full rank,
so `rank_ratio` 0.5 saves nothing on MiniLM's 384 x 384 attention projections.

Calibrated (the default): the error that matters is in the layer's outputs, ||(W - W_r) X|| over
real inputs X, not in its weights. The inputs of every chosen layer are recorded on a sample of the
task's fitting split and the SVD is taken of W whitened by their covariance (as SVD-LLM does). On
minilm-l6 at the same ranks this raised the embeddings' mean cosine to the original from 0.63 to
0.93 (rank ratio 0.5) and from 0.66 to 0.95 (energy 0.9), and recall@1 from -3.9 to -1.2 and from
-3.5 to +0.4 points (bench/lowrank_cluster.py).

The helpers below (`weight_layers`, `layers_reaching_output`, `replace_module`) are also used by
share.cluster.
"""
from __future__ import annotations

from functools import lru_cache

from services.engine.registry import Method, Param

LAYER_CHOICES = ("all", "linear", "conv")
# Samples of the fitting split whose layer inputs the calibrated factorization sees. 128 MiniLM
# paragraphs (about 6 k tokens) took 11 s on a busy 2-core machine, 256 took 21 s.
CALIBRATION_SAMPLES = 128
MAX_CALIBRATED_INPUTS = 4096


# ---- helpers shared with share.cluster ----------------------------------------------------------

def weight_layers(model, which: str) -> list:
    """(name, module) of the Linear and plain (groups=1, zero-padded) Conv1d/Conv2d layers, per `which`."""
    import torch

    kinds = {"all": (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d), "linear": (torch.nn.Linear,),
             "conv": (torch.nn.Conv1d, torch.nn.Conv2d)}[which]
    found = []
    for name, module in model.named_modules():
        if type(module) not in kinds:  # exact types: a subclass may use its weight in its own way
            continue
        if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d) and (module.groups != 1
                                                                      or module.padding_mode != "zeros"):
            continue  # depthwise/grouped convolutions are already thin; other paddings are rare
        found.append((name, module))
    return found


def tied_weight_ids(model) -> set:
    """ids of weights that belong to more than one module (a language-model head tied to the
    embedding): replacing one owner would store the matrix twice. One module used at several places
    (share.layers) is not tied: it is replaced once, everywhere it runs."""
    owners: dict = {}
    for module in model.modules():  # each module object once
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), set()).add(id(module))
    return {key for key, modules in owners.items() if len(modules) > 1}


def _tensors_in(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):  # includes Hugging Face ModelOutput
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors_in(v)]
    return []


def layers_reaching_output(model, layers: list, adapter) -> set:
    """Names of the layers whose weights influence the exported outputs.

    Some layers run but feed nothing the export keeps (BERT's pooler under a sentence encoder's mean
    pooling): the exporter drops them, so changing them would only make the notes wrong. One forward
    and backward pass on the adapter's example inputs finds them. Without an adapter, or when the
    pass fails, every layer counts.
    """
    import torch

    names = [name for name, _ in layers]
    if adapter is None or not layers:
        return set(names)
    weights = [module.weight for _, module in layers]
    before = [w.requires_grad for w in weights]
    try:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            outputs = _tensors_in(model(*adapter.example_inputs()))
            total = sum(t.float().sum() for t in outputs)
            grads = torch.autograd.grad(total, weights, allow_unused=True)
        return {name for name, grad in zip(names, grads) if grad is not None}
    except Exception:  # noqa: BLE001 - a model we cannot differentiate: keep every layer
        return set(names)
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)


def replace_module(model, old, new) -> None:
    """Put `new` wherever `old` is a child (a shared layer can sit in several places)."""
    for parent in list(model.modules()):
        for attribute, child in list(parent._modules.items()):  # named_children() lists a repeat once
            if child is old:
                setattr(parent, attribute, new)


def millions(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 100_000 else f"{count:,}"


# ---- the factorization --------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _factorized_class():
    """nn.Sequential(first, second) that also answers `.weight` and `.bias` like the layer it
    replaced (some model code reads `layer.weight.dtype`). Built on first use: no torch at import."""
    import torch

    class Factorized(torch.nn.Sequential):
        @property
        def weight(self):  # the product the two factors compute, in the original layer's shape
            first, second = self[0].weight, self[1].weight
            product = second.flatten(1) @ first.flatten(1)
            return product.reshape(second.shape[0], *first.shape[1:])

        @property
        def bias(self):
            return self[1].bias

    return Factorized


def _layer_rows(module, x, mask):
    """The layer's input as the rows its weight matrix multiplies: feature vectors for a Linear
    (padding tokens left out when the batch has an attention mask), image patches for a convolution."""
    import torch
    import torch.nn.functional as F

    if isinstance(module, torch.nn.Linear):
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.bool()]
        return x.reshape(-1, x.shape[-1])
    if isinstance(module.padding, str):
        return None  # 'same' / 'valid' padding: no patch view here, the layer is fitted on its weights
    if isinstance(module, torch.nn.Conv1d):  # a 1-D convolution is a 2-D one with a width-1 kernel
        x = x.unsqueeze(-1)
        geometry = dict(kernel_size=(module.kernel_size[0], 1), dilation=(module.dilation[0], 1),
                        padding=(module.padding[0], 0), stride=(module.stride[0], 1))
    else:
        geometry = dict(kernel_size=module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)
    patches = F.unfold(x, **geometry)  # (batch, in * k * k, positions), in the order of weight.flatten(1)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def input_covariances(model, layers: list, context) -> tuple[dict, str]:
    """X^T X of each layer's inputs over a sample of the task's fitting split, and a sentence on what
    was used (or why nothing was: then every layer is fitted on its weights alone)."""
    import numpy as np
    import torch

    from services.errors import UserError

    adapter = context.adapter
    if adapter is None or not layers:
        return {}, "no inputs to fit on"
    try:
        fit = context.reencode(context.fit_set())  # a rebuilt tokenizer numbers tokens differently
    except Exception as error:  # noqa: BLE001 - no fitting data (an upload without a data set): weights only
        why = str(error) if isinstance(error, UserError) else type(error).__name__
        return {}, f"no fitting data ({why})"
    picks = np.linspace(0, len(fit) - 1, min(len(fit), CALIBRATION_SAMPLES)).round().astype(int)
    sums: dict = {}
    current_mask: list = [None]

    def hook(name):
        def record(module, args):
            rows = _layer_rows(module, args[0].detach(), current_mask[0])
            if rows is not None:
                rows = rows.float()
                sums[name] = sums.get(name, 0) + (rows.T @ rows).double()
        return record

    # A covariance holds fan_in^2 doubles: beyond 4096 inputs (128 MB each) a layer keeps to its weights.
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers
               if module.weight[0].numel() <= MAX_CALIBRATED_INPUTS]
    try:
        with torch.no_grad():
            for start in range(0, len(picks), 32):
                batch = {key: torch.from_numpy(values[picks[start:start + 32]]) for key, values in fit.inputs.items()}
                current_mask[0] = batch.get("attention_mask")
                model(*[batch[name] for name in adapter.input_names])
    except Exception as error:  # noqa: BLE001 - samples this model cannot take: weights only
        return {}, f"the fitting samples did not run through the model ({type(error).__name__})"
    finally:
        for handle in handles:
            handle.remove()
    return sums, f"fitted to the layers' inputs on {len(picks)} samples of the fitting split"


def decompose(matrix, covariance=None):
    """u, s, back with matrix ~= (u[:, :r] * s[:r]) @ back[:r] for any r, the best rank-r
    approximation for inputs with that covariance (or for the weights alone without one).

    With inputs X, the error that matters is ||(W - W_r) X||, not ||W - W_r||. Whitening does it
    (as SVD-LLM): C = L L^T, SVD of W L, then undo L in the right factor. A small ridge on C keeps
    directions the sample never excited (an always-blank pixel) fitted on the weights.
    """
    import torch

    if covariance is None:
        return torch.linalg.svd(matrix.float(), full_matrices=False)
    ridge = 1e-2 * covariance.diagonal().mean().clamp(min=1e-12)
    lower = torch.linalg.cholesky(covariance + ridge * torch.eye(len(covariance), dtype=covariance.dtype))
    u, s, vh = torch.linalg.svd((matrix.double() @ lower).float(), full_matrices=False)
    back = torch.linalg.solve_triangular(lower, vh.double(), upper=False, left=False)  # vh @ L^-1
    return u, s, back.float()


def _kept_rank(matrix, full_rank: int, params: dict) -> int:
    """The rank to keep. 'energy' reads the weights' own spectrum, also when the factorization is
    calibrated: the output spectrum on real inputs is dominated by one or two directions (the mean
    activation), so an output-energy share picked rank 1 for some MiniLM layers at 0.9."""
    import torch

    if params["mode"] == "rank_ratio":
        return max(1, min(full_rank, round(params["rank_ratio"] * full_rank)))
    energy = torch.linalg.svdvals(matrix.double()) ** 2
    share = torch.cumsum(energy, 0) / energy.sum()
    # the smallest r whose first r singular values keep at least that share of the squared energy
    return min(full_rank, int(torch.searchsorted(share, torch.tensor([params["energy"]], dtype=share.dtype))) + 1)


def _factorize(module, rank: int, u, s, back):
    import torch

    root = s[:rank].sqrt()  # the scale split evenly between the two factors
    first_weight = root[:, None] * back[:rank]  # (r, in * k * k)
    second_weight = u[:, :rank] * root[None, :]  # (out, r)
    if isinstance(module, torch.nn.Linear):
        first = torch.nn.Linear(module.in_features, rank, bias=False)
        second = torch.nn.Linear(rank, module.out_features, bias=module.bias is not None)
    else:
        conv = type(module)
        first = conv(module.in_channels, rank, module.kernel_size, stride=module.stride, padding=module.padding,
                     dilation=module.dilation, bias=False)
        second = conv(rank, module.out_channels, 1, bias=module.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_weight.reshape(first.weight.shape))
        second.weight.copy_(second_weight.reshape(second.weight.shape))
        if module.bias is not None:
            second.bias.copy_(module.bias)
    factorized = _factorized_class()(first, second)
    return factorized.to(module.weight.dtype).train(module.training)


def apply(model, params: dict, context) -> None:
    layers = weight_layers(model, params["layers"])
    if not layers:
        what = {"all": "linear or convolution", "linear": "linear", "conv": "convolution"}[params["layers"]]
        raise context.user_error(f"This model has no {what} layers that low-rank factorization can split; "
                                 f"choose another 'layers' setting or another method.")
    reaching = layers_reaching_output(model, layers, context.adapter)
    tied = tied_weight_ids(model)
    skipped = {"small": 0, "tied": 0, "no_saving": 0}
    planned = []  # (name, module, rank) of the layers that get smaller
    for name, module in layers:
        if name not in reaching:
            continue  # not part of the exported model: neither counted nor changed
        matrix = module.weight.detach().flatten(1)  # (out, in * k * k)
        if id(module.weight) in tied:
            skipped["tied"] += 1
        elif matrix.numel() < params["min_weights"]:
            skipped["small"] += 1
        else:
            rank = _kept_rank(matrix, min(matrix.shape), params)
            if rank * sum(matrix.shape) >= matrix.numel():
                skipped["no_saving"] += 1
            else:
                planned.append((name, module, rank))
    covariances, fitted_on = {}, "fitted on the weights alone"
    if params["calibrate"] and planned:
        context.progress(0.3, "lowrank.svd: recording the layers' inputs on the fitting split")
        covariances, fitted_on = input_covariances(model, [(name, module) for name, module, _ in planned], context)
        if not covariances:
            fitted_on = f"fitted on the weights alone: {fitted_on}"
    before, after, errors = 0, 0, []
    for index, (name, module, rank) in enumerate(planned):
        context.progress(0.35 + 0.2 * index / len(planned), f"lowrank.svd: {name}")
        matrix = module.weight.detach().flatten(1)
        u, s, back = decompose(matrix, covariances.get(name))
        replace_module(model, module, _factorize(module, rank, u, s, back))
        before += matrix.numel()
        after += rank * sum(matrix.shape)
        errors.append(float((s[rank:].double() ** 2).sum() / (s.double() ** 2).sum()) ** 0.5)
    factorized, ranks = len(planned), [rank for _, _, rank in planned]
    considered = factorized + sum(skipped.values())
    reason_texts = {"no_saving": "would not get smaller at that rank",
                    "small": f"have fewer than {params['min_weights']:,} weights",
                    "tied": "share their weights with another layer"}
    reasons = [f"{skipped[key]} {text}" for key, text in reason_texts.items() if skipped[key]]
    setting = (f"rank ratio {params['rank_ratio']:g}" if params["mode"] == "rank_ratio"
               else f"{params['energy']:.4g} of the energy")
    if not factorized:
        hint = ("lower 'rank_ratio' (a square layer only shrinks below 0.5)" if params["mode"] == "rank_ratio"
                else "lower 'energy' or use mode 'rank_ratio'")
        raise context.user_error(f"No layer was factorized at {setting}: of {considered} layers, "
                                 f"{'; '.join(reasons) or 'none qualified'}. To shrink the model, {hint}.")
    error_of = "their outputs on those samples" if covariances else "their weights"
    context.notes.append(
        f"lowrank.svd ({setting}, {fitted_on}): factorized {factorized} of {considered} layers into two thin ones "
        f"(ranks {min(ranks)}–{max(ranks)}; {error_of} moved by {100 * sum(errors) / len(errors):.0f}% of their "
        f"norm on average)"
        + (f"; left {'; '.join(reasons)}" if reasons else "")
        + f". Parameters in the factorized layers: {millions(before)} → {millions(after)} "
          f"({millions(before - after)} fewer). Nothing is retrained: low ranks cost accuracy.")


METHOD = Method(
    name="lowrank.svd",
    title="Low-rank factorization (truncated SVD)",
    explanation=(
        "Replaces each large weight matrix by the product of two thin ones that keep its strongest "
        "directions, so the model has fewer parameters and does less arithmetic; the more it cuts, "
        "the more accuracy it costs, since nothing is retrained."
    ),
    stage="torch",
    applies_to=("torch",),
    params=(
        # 'energy' by default: at 0.9 it kept minilm-l6's embeddings at cosine 0.95 (calibrated) and
        # digits-cnn-x4's accuracy within 0.2 points, where one rank ratio for all layers hurt more.
        Param("mode", "choice", "energy",
              "'rank_ratio' keeps the same share of every layer's rank; 'energy' keeps, per layer, the fewest "
              "directions that hold the given share of the weights' energy (layers with a flat spectrum keep more).",
              choices=("rank_ratio", "energy")),
        Param("rank_ratio", "float", 0.25,
              "Share of each layer's full rank to keep (mode 'rank_ratio'). A square layer only gets smaller "
              "below 0.5.", minimum=0.01, maximum=1.0, step=0.05),
        Param("energy", "float", 0.9,
              "Mode 'energy': per layer, keep the fewest directions that hold this share of the weights' energy "
              "(squared singular values); 0.99 keeps almost everything, which often means no saving.",
              minimum=0.1, maximum=0.9999, step=0.01, compresses="lower"),
        Param("calibrate", "bool", True,
              "Fit each factorization to what the layer actually receives (inputs from the task's fitting "
              "split) instead of to its weights alone: the same rank keeps much more accuracy. Costs a few "
              "seconds of running the model on those samples."),
        # 4096 leaves out the digits CNNs' 10-class output layers (320 to 1,280 weights): at rank ratio
        # 0.5 their 10 logits would come from 5 directions.
        Param("min_weights", "int", 4096,
              "Leave layers with fewer weights than this alone: splitting them saves little, and a small "
              "output layer (one row per class) loses the most from a lower rank.",
              minimum=0, maximum=100_000_000, step=256),
        Param("layers", "choice", "all",
              "Which layers to factorize: linear (fully connected) layers, convolutions, or both.",
              choices=LAYER_CHOICES),
    ),
    effect_note=("Fewer parameters, a smaller file and fewer multiply-adds in the factorized layers; speed "
                 "follows only when the layers are large. Layers that would not get smaller are left as they "
                 "are. Accuracy drops with the rank, as the layers are not retrained."),
    apply=apply,
)
