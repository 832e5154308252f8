"""Recovery training: a short training of the compressed PyTorch model that wins back what compression
cost, with the objective the user's data allows (the recipe's `recovery`).

It runs after the recipe's PyTorch steps and before the export, so that ONNX-stage steps (quantization)
apply to the recovered weights. The original model is the teacher of every objective; nothing of it
is changed. What each objective trains on is the task's fitting split (never the scored samples).

- `supervised`: cross-entropy on the fitting split's labels (class-score models with labels only).
- `distill`: the original's outputs and hidden states (services/engine/distill.py), no labels.
- `contrastive`: Contrastive Pruning (Xu et al., CAP): an InfoNCE loss pulls each sample's
  representation toward the original's representation of the same sample, against the other samples
  of the batch; with `rounds`, also toward the snapshots of earlier pruning rounds; with labels, samples
  of the same class count as positives too (CAP's fine-tuned contrast) and cross-entropy is added.
  Our built-in models are each one checkpoint, so CAP's pre-trained and fine-tuned models are the same
  original here (the run's note says so).
- `masked`: MAE-style masking: the compressed model sees inputs with a share of positions hidden
  (tokens replaced by the mask token, image patches and speech frames zeroed) and learns to reconstruct
  what the original computes from the full input (its hidden states and output), as data2vec does with
  MAE's masking; no labels, no decoder to throw away.

`unfreeze`: `all` trains every weight; `frozen` only the head (the last group of layers); `gradual`
starts with the head and unfreezes one more group from the top down at even intervals, so the last
stretch trains everything. Pruned weights stay zero throughout (a mask is re-imposed after each update).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.engine import distill
from services.engine.contrast import ContrastiveTerm, MomentumTerm, info_nce, pooled  # noqa: F401 (info_nce: tests)
from services.engine.objectives import OBJECTIVES, UNFREEZE, has_class_labels

# text: 5e-4 measured better than 5e-5 for MiniLM at half its heads and neurons (cosine 0.929 / 0.904, 300 steps)
DEFAULT_LR = {"cnn": 1e-3, "text-transformer": 5e-4, "speech-transformer": 3e-4}
MASK_SHARE = 0.25  # share of positions hidden by `masked`
CONTRASTIVE_WEIGHT = 1.0


# ---- layer groups: what `frozen` and `gradual` unfreeze ----------------------------------------------

def parameters_reaching_output(net: nn.Module, adapter) -> set[int]:
    """ids of the parameters the outputs depend on (one forward and backward pass on the adapter's
    example inputs): BERT's pooler, which a sentence encoder's mean pooling never reads, is left out,
    so `frozen` does not train a head that changes nothing. Every parameter when the pass fails."""
    every = {id(p) for p in net.parameters()}
    if adapter is None:
        return every
    parameters = list(net.parameters())
    before = [p.requires_grad for p in parameters]
    try:
        with torch.enable_grad():
            for parameter in parameters:
                parameter.requires_grad_(True)
            outputs = net(*adapter.example_inputs())
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            total = sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor))
            grads = torch.autograd.grad(total, parameters, allow_unused=True)
        return {id(p) for p, g in zip(parameters, grads) if g is not None}
    except Exception:  # noqa: BLE001 - a model we cannot differentiate: count every parameter
        return every
    finally:
        for parameter, flag in zip(parameters, before):
            parameter.requires_grad_(flag)


def layer_groups(net: nn.Module, adapter=None) -> list[list[nn.Parameter]]:
    """The model's parameters in groups from the input to the output. A transformer: what comes
    before its list of blocks (embeddings), each block, what comes after (the head). Other models:
    each module that owns parameters, in order. Tied parameters count once, in their first group;
    parameters the outputs do not depend on (with an adapter to probe them) are left out."""
    from services.engine.methods.distill_student import find_layer_list

    reaching = parameters_reaching_output(net, adapter)
    seen: set[int] = {id(p) for p in net.parameters() if id(p) not in reaching}

    def fresh(params) -> list[nn.Parameter]:
        out = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in out)
        return out

    found = find_layer_list(net)
    if found is not None:
        name, blocks = found
        inside = {id(p) for p in blocks.parameters()}
        order = list(net.named_parameters(remove_duplicate=True))
        first_block = next(i for i, (n, _) in enumerate(order) if n.startswith(name + "."))
        before = fresh([p for n, p in order[:first_block] if id(p) not in inside])
        groups = [before] + [fresh(block.parameters()) for block in blocks]
        groups.append(fresh([p for _, p in order if id(p) not in inside]))
    else:
        groups = [fresh(module.parameters(recurse=False)) for module in net.modules()]
    return [g for g in groups if g]


def unfreeze_schedule(groups: list[list[nn.Parameter]], mode: str, steps: int) -> Callable[[int], None]:
    """before_step(step) that sets requires_grad for `mode` (see the module's docstring)."""
    def set_trainable(count: int) -> None:
        for index, group in enumerate(groups):
            for parameter in group:
                parameter.requires_grad_(index >= len(groups) - count)

    if mode == "all":
        set_trainable(len(groups))
        return lambda step: None
    if mode == "frozen":
        set_trainable(1)
        return lambda step: None
    # gradual: group k of n opens at step k * steps / n (counted from the top), all open for the last share
    def before_step(step: int) -> None:
        set_trainable(min(len(groups), 1 + step * len(groups) // max(1, steps)))

    before_step(0)
    return before_step


# ---- pruned weights stay pruned ---------------------------------------------------------------------

def zero_masks(net: nn.Module) -> Callable[[], None]:
    """An after_step that puts back the zeros a pruning step made: every weight matrix or kernel with
    exact zeros keeps them (a trained float weight is never exactly zero by chance)."""
    masks = [(p, p.detach() != 0) for p in net.parameters() if p.dim() >= 2 and bool((p.detach() == 0).any())]

    def reapply() -> None:
        with torch.no_grad():
            for parameter, mask in masks:
                parameter.mul_(mask.to(parameter.device))  # a no-op move on the CPU; a GPU job trains there

    return reapply


# ---- the model kinds: batches, matched states, representation, masking ------------------------------

@dataclass
class Kit:
    batches: object  # Iterator[distill.Batch]
    output_loss: Callable  # matching the original's outputs (distill)
    hidden_pairs: list  # (student submodule, teacher submodule)
    representation: tuple  # (student submodule, teacher submodule) pooled into one vector per sample
    mask_inputs: Callable | None  # Batch -> masked inputs for the student
    samples: int
    labels: np.ndarray | None
    data: str = "fitting samples"  # what the samples are, for the run's note


def _weighted_layers(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]


def _block_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """Student block j with the teacher block it stands for (evenly spaced when a student has fewer).
    A block the student runs at several depths (share.layers) is registered under its first name
    only, and its recorded output is that of its last use: it is paired with the teacher's block there."""
    from services.engine.methods.distill_student import find_layer_list, kept_layers

    s_name, s_blocks = find_layer_list(student)
    t_name, t_blocks = find_layer_list(teacher)
    indices = kept_layers(len(t_blocks), len(s_blocks)) if len(s_blocks) < len(t_blocks) else range(len(s_blocks))
    last_use = {id(block): j for j, block in enumerate(s_blocks)}
    first_name = {}
    for j, block in enumerate(s_blocks):
        first_name.setdefault(id(block), f"{s_name}.{j}")
    return [(first_name[id(block)], f"{t_name}.{list(indices)[last_use[id(block)]]}")
            for j, block in enumerate(s_blocks) if last_use[id(block)] == j]


def build_kit(architecture: str, student: nn.Module, teacher: nn.Module, context, batch_size: int,
              seed: int, rows: np.ndarray | None = None) -> Kit:
    """The batches and matched states of one recovery; `rows` restricts training to those fitting
    samples (the ones a label budget paid for)."""
    adapter = context.adapter
    fit = context.fit_set()
    names = list(adapter.input_names)
    arrays = [fit.inputs[name] for name in names]
    labels = fit.labels if has_class_labels(fit, adapter.output_kind) else None
    if rows is not None:
        arrays = [array[rows] for array in arrays]
        labels = None if labels is None else labels[rows]
    generator = torch.Generator().manual_seed(seed + 1)
    if architecture == "cnn":
        hidden = [n for n in _weighted_layers(student)[:-1] if n in dict(teacher.named_modules())]

        def mask_images(batch):  # zero random 2x2 patches (an 8x8 digit has 16)
            images = batch.inputs[0]
            h, w = images.shape[-2] // 2, images.shape[-1] // 2
            keep = (torch.rand((len(images), 1, h, w), generator=generator) >= MASK_SHARE).to(images)
            return (images * F.interpolate(keep, scale_factor=2, mode="nearest"),) + tuple(batch.inputs[1:])

        return Kit(distill.batches_from_arrays(arrays, batch_size, seed, labels=labels),
                   distill.output_loss_for(adapter.output_kind), [(n, n) for n in hidden],
                   (hidden[-1], hidden[-1]), mask_images, len(arrays[0]), labels)
    if architecture == "text-transformer":
        if "attention_mask" not in names or "input_ids" not in names:
            raise context.user_error("Recovery needs a text model that takes input_ids and an attention mask.")
        pairs = _block_pairs(student, teacher)
        ids_at, mask_at = names.index("input_ids"), names.index("attention_mask")
        mask_id = adapter.mask_token_id() if hasattr(adapter, "mask_token_id") else None

        def mask_tokens(batch):  # hide real tokens (not the first and last: [CLS] and [SEP]) behind [MASK]
            inputs = list(batch.inputs)
            ids, real = inputs[ids_at], inputs[mask_at].bool()
            inner = real.clone()
            inner[:, 0] = False
            inner[torch.arange(len(ids), device=ids.device), real.sum(1) - 1] = False
            hide = inner & (torch.rand(ids.shape, generator=generator) < MASK_SHARE).to(ids.device)
            inputs[ids_at] = torch.where(hide, torch.full_like(ids, int(mask_id)), ids)
            return tuple(inputs)

        data = "fitting samples"
        if labels is None and context.model_id == "minilm-l6" and hasattr(adapter, "encode"):
            fitting = len(arrays[0])
            arrays = _with_stdlib_text(arrays, names, fit, adapter)
            data = (f"texts ({fitting} fitting paragraphs and {len(arrays[0]) - fitting} docstring paragraphs of "
                    "Python's standard library, none of them scored)")
        return Kit(distill.batches_from_arrays(arrays, batch_size, seed, labels=labels, mask_index=mask_at,
                                               trim_to_mask=True),
                   distill.output_loss_for(adapter.output_kind), pairs, pairs[-1],
                   mask_tokens if mask_id is not None else None, len(arrays[0]), labels, data)
    if architecture == "speech-transformer":
        from services.engine.methods.distill_student import speech_output_loss, with_frame_masks

        pairs = _block_pairs(student, teacher)

        def mask_frames(batch):  # hide a quarter of the frames, in runs of 4 (80 ms each)
            features, lengths = batch.inputs
            runs = (features.shape[1] + 3) // 4
            keep = (torch.rand((len(features), runs), generator=generator) >= MASK_SHARE).to(features)
            keep = keep.repeat_interleave(4, dim=1)[:, :features.shape[1], None]
            # a hidden frame is the average frame (0 after the model's normalisation), not a loud outlier
            return features * keep + student.feature_mean * (1 - keep), lengths

        return Kit(with_frame_masks(distill.batches_from_arrays(arrays, batch_size, seed)),
                   speech_output_loss(student, 2.0), pairs, pairs[-1], mask_frames, len(arrays[0]), None)
    raise context.user_error(f"Recovery cannot train a {architecture or 'model'} of this kind.")


def _with_stdlib_text(arrays: list, names: list, fit, adapter) -> list:
    """MiniLM's label-free recovery also trains on the standard library's docstring paragraphs (none
    of them scored), as distill.student does: 765 fitting paragraphs alone are seen 25 times in 600
    steps, and the recovered model fits them rather than text in general."""
    import numpy as np

    from services.engine.training_text import scored_texts, stdlib_paragraphs

    texts = list(fit.extra.get("texts") or [])
    extra = stdlib_paragraphs(exclude=frozenset(scored_texts()) | frozenset(texts))
    encoded = adapter.encode(extra)
    return [np.concatenate([a, encoded[name]]) for a, name in zip(arrays, names)]


def labelled_rows(student: nn.Module, teacher: nn.Module, recovery: dict, context) -> np.ndarray | None:
    """The fitting samples whose labels a `label_budget` buys, chosen once by the recipe's `selection`
    (later rounds of an iterative schedule keep the samples already labelled); None without a budget.
    The choice is recorded for the run's page."""
    if not recovery.get("label_budget"):
        return None
    recorded = context.extra_metrics.get("labelled_samples")
    if recorded is not None:
        return np.asarray(recorded["indices"], dtype=np.int64)
    from services.engine import selection

    fit = context.fit_set()
    arrays = [fit.inputs[name] for name in context.adapter.input_names]
    strategy = recovery.get("selection", "random")
    try:
        rows, how = selection.choose_with_note(strategy, recovery["label_budget"], arrays, student, teacher,
                                               getattr(context.adapter, "coupling", None), recovery["seed"])
    except ValueError as error:  # a budget larger than this data set (an upload's size is known here only)
        raise context.user_error(str(error)) from None
    context.notes.append(f"Labels: {how}.")
    context.extra_metrics["labelled_samples"] = {
        "selection": strategy, "count": int(len(rows)), "of": int(len(arrays[0])), "indices": [int(i) for i in rows]}
    return rows


# ---- one recovery ------------------------------------------------------------------------------------

def recover(student: nn.Module, teacher: nn.Module, recovery: dict, context, *, snapshots: list[nn.Module] = (),
            steps: int | None = None, describe: str = "recovering") -> tuple[str, distill.Outcome]:
    """Train `student` in place with the recipe's recovery; returns the sentence the run shows and the
    training's outcome (its loss at every step)."""
    objective = recovery["objective"]
    architecture = context.architecture
    rows = labelled_rows(student, teacher, recovery, context)
    kit = build_kit(architecture, student, teacher, context, recovery["batch_size"], recovery["seed"], rows)
    steps = steps or recovery["steps"]
    lr = recovery.get("lr") or DEFAULT_LR.get(architecture, 1e-4)
    labels_used = kit.labels is not None and objective in ("supervised", "contrastive", "momentum-contrast")
    if objective == "supervised" and kit.labels is None:
        raise context.user_error("Supervised recovery needs class labels, and this model's fitting data has none.")
    if objective in ("masked", "momentum-contrast") and kit.mask_inputs is None:
        raise context.user_error(f"{OBJECTIVES[objective].title} needs a mask token, and this model's tokenizer "
                                 "has none.")
    # a multi-task model whose second head's classes follow from the first's (digits-multitask: odd or
    # even) learns both from the one label a sample carries
    coupling = getattr(context.adapter, "coupling", None)

    def cross_entropy(student_out, teacher_out, batch):
        outputs = student_out if isinstance(student_out, (tuple, list)) else (student_out,)
        loss = F.cross_entropy(outputs[0], batch.labels)
        if coupling is not None and len(outputs) > 1:
            coarse = torch.as_tensor(np.asarray(coupling).argmax(1), device=batch.labels.device)[batch.labels]
            loss = loss + F.cross_entropy(outputs[1], coarse)
        return loss

    output_loss, hidden_pairs, hidden_weight, extra, extra_modules, student_inputs = None, [], 0.0, None, [], None
    after_step = zero_masks(student)
    if objective == "supervised":
        output_loss = cross_entropy
    elif objective == "distill":
        output_loss, hidden_pairs, hidden_weight = kit.output_loss, kit.hidden_pairs, 1.0
    elif objective == "masked":
        output_loss, hidden_pairs, hidden_weight, student_inputs = kit.output_loss, kit.hidden_pairs, 1.0, kit.mask_inputs
    elif objective == "contrastive":
        hidden_pairs = [kit.representation]  # recorded for the contrast; not matched directly
        probe = next(kit.batches)
        with torch.no_grad(), distill.recording(student, [kit.representation[0]]) as s, \
                distill.recording(teacher, [kit.representation[1]]) as t:
            student(*probe.inputs)
            teacher(*probe.inputs)
        term = ContrastiveTerm(pooled(s[kit.representation[0]], probe.mask).shape[-1],
                               pooled(t[kit.representation[1]], probe.mask).shape[-1], list(snapshots),
                               kit.representation)
        extra, extra_modules = (lambda state: CONTRASTIVE_WEIGHT * term(state)), [term]
        if kit.labels is not None:
            output_loss = cross_entropy
    elif objective == "momentum-contrast":
        term = MomentumTerm(student, kit, next(kit.batches))
        extra, extra_modules = term, [term]
        # the contrast shapes the representation; the output head is held to the labels when there are
        # some, else to the original's outputs (nothing else tells the head what the classes are)
        output_loss = cross_entropy if kit.labels is not None else kit.output_loss
        keep_zeros = after_step

        def after_step():
            keep_zeros()
            term.follow()
    else:
        raise context.user_error(f"Unknown recovery objective {objective!r}.")
    helpers = list(recovery.get("aux") or [])
    if helpers:
        from services.engine.aux_heads import AuxiliaryTerm

        aux = AuxiliaryTerm(helpers, student, architecture, next(kit.batches), recovery["seed"])
        main = extra
        extra = aux if main is None else (lambda state: main(state) + aux(state))
        extra_modules = list(extra_modules) + [aux]

    groups = layer_groups(student, context.adapter)
    before_step = unfreeze_schedule(groups, recovery["unfreeze"], steps)
    outcome = distill.train(
        student, teacher, kit.batches, output_loss, steps=steps, lr=lr, progress=context.progress,
        hidden_pairs=hidden_pairs, hidden_weight=hidden_weight, shared_projections=False, seed=recovery["seed"],
        after_step=after_step, describe=describe, parameters=[p for g in groups for p in g],
        before_step=before_step, student_inputs=student_inputs, extra_loss=extra, extra_modules=extra_modules)
    for group in groups:
        for parameter in group:
            parameter.requires_grad_(True)
    start, end = outcome.losses[0], outcome.final_loss
    used = "the fitting samples' labels" if labels_used else "no labels"
    if rows is not None:
        chosen = context.extra_metrics["labelled_samples"]
        used = f"their labels, chosen by {chosen['selection']}" if labels_used else "no labels"
    if objective == "momentum-contrast":
        used += ("; momentum contrast against a queue of earlier samples' keys, the output head held to "
                 + ("the labels" if labels_used else "the original's outputs"))
    if helpers:
        used += f"; training-only helpers: {', '.join(helpers)} (not exported)"
    if objective == "contrastive":
        used += (f"; contrast against the original{' and ' + str(len(snapshots)) + ' earlier round(s)' if snapshots else ''}"
                 " (CAP's pre-trained and fine-tuned models are one checkpoint here)")
    data = f"of {chosen['of']:,} fitting samples" if rows is not None else kit.data
    return (f"Recovery ({objective}): {steps} steps ({outcome.seconds:.0f} s) on {kit.samples:,} {data}, "
            f"{used}; {UNFREEZE[recovery['unfreeze']]}; loss {start:.4f} → {end:.4f}."), outcome


def snapshot(net: nn.Module) -> nn.Module:
    """A frozen copy of the model as it is now (CAP's snapshot of an earlier pruning round)."""
    frozen = copy.deepcopy(net).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen
