"""Knowledge distillation, reusable by any method: a student learns to reproduce a teacher.

What a method brings: the student and the teacher (two torch modules taking the same inputs), a
source of input batches, a loss on their outputs, and which hidden states to match. What this
module does: records the teacher's targets (its outputs and hidden states, no gradients), matches
hidden states of different widths through learned projections (training-only: they are dropped
when training ends, nothing of them is exported), and runs a bounded, seeded training loop.

The hidden-state matching follows the mixed-vocabulary distillation paper (Zhao et al., "Extremely
small BERT models from mixed-vocabulary training"): layer-wise knowledge goes through projection
matrices, shared by every pair of layers of the same shape.

Used by distill.student (a smaller model trained from the original) and meant for "distill"
recovery after other compression steps (the compressed model is then the student, the original the
teacher; `after_step` can re-impose a pruning mask after each update).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Progress = Callable[[float, str], None]


@dataclass
class Batch:
    """One training batch: the positional inputs both models take, and what the losses may need."""
    inputs: tuple
    labels: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (batch, positions) 1 for real tokens/frames: padding is not matched
    # Mixed vocabularies: the same samples as the student reads them (its own token ids), when they
    # differ from the teacher's `inputs`, and their real positions.
    student_inputs: tuple | None = None
    student_mask: torch.Tensor | None = None

    def for_student(self) -> tuple:
        return self.inputs if self.student_inputs is None else self.student_inputs

    def to(self, device) -> "Batch":
        from services.engine.device import to_device

        return Batch(to_device(self.inputs, device), to_device(self.labels, device), to_device(self.mask, device),
                     to_device(self.student_inputs, device), to_device(self.student_mask, device))


@dataclass
class Outcome:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # the total loss of every step

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps: one step's loss is too noisy to report."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(np.mean(tail)) if tail else float("nan")


# ---- the losses -----------------------------------------------------------------------------------

def soft_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence between the softened class distributions (Hinton et al.), scaled by T² so its
    gradients keep their size whatever the temperature."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    log_target=True, reduction="batchmean") * t * t


def cosine_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged over the batch: what embedding fidelity measures."""
    return (1.0 - F.cosine_similarity(student_embedding, teacher_embedding, dim=-1)).mean()


def hidden_state_loss(projected: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error relative to the target's mean square, so layers of any scale weigh alike.
    With a mask, (batch, positions, features) states count only real positions (states of another
    length, such as frames pooled inside the model, count every position)."""
    squared = (projected - target) ** 2
    scale = target.detach() ** 2
    if mask is not None and target.dim() == 3 and mask.shape[:2] == target.shape[:2]:
        weights = mask.to(target.dtype)[..., None]
        return (squared * weights).sum() / (scale * weights).sum().clamp(min=1e-12)
    return squared.mean() / scale.mean().clamp(min=1e-12)


def masked_mean(state: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, positions, features) -> (batch, features): the mean over real positions."""
    if mask is None or mask.shape[:2] != state.shape[:2]:
        return state.mean(1)
    weights = mask.to(state.dtype)[..., None]
    return (state * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def matched_states(student_state: torch.Tensor, teacher_state: torch.Tensor, batch: Batch):
    """(student, teacher, mask) to compare. Token by token where both read the same positions; where
    their tokenizers split the text differently (a trimmed vocabulary spelling a word in pieces), the
    positions no longer correspond, so each layer is compared by its mean over the real tokens."""
    if student_state.dim() == 3 and batch.student_inputs is not None \
            and student_state.shape[1] != teacher_state.shape[1]:
        return (masked_mean(student_state, batch.student_mask)[:, None],
                masked_mean(teacher_state, batch.mask)[:, None], None)
    return student_state, teacher_state, batch.mask if batch.student_inputs is None else batch.student_mask


def output_loss_for(output_kind: str, temperature: float = 2.0):
    """The usual loss on a model's first output, by the adapter's `output_kind`: softened class
    scores for 'logits' (per position too: the last axis is the classes), cosine for 'embedding'."""
    def first(outputs):
        return outputs[0] if isinstance(outputs, (tuple, list)) else outputs

    def loss(student_out, teacher_out, batch):
        s, t = first(student_out), first(teacher_out)
        if output_kind == "embedding":
            return cosine_loss(s.reshape(len(s), -1), t.reshape(len(t), -1))
        return soft_logit_loss(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), temperature)

    return loss


# ---- the teacher's targets: outputs of named submodules --------------------------------------------

def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    hidden = getattr(value, "last_hidden_state", None)  # a transformers ModelOutput
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot read a hidden state from a {type(value).__name__}")


@contextmanager
def recording(module: nn.Module, names: list[str]):
    """Within the block, every forward of `module` records the outputs of the named submodules."""
    found = dict(module.named_modules())
    missing = [n for n in names if n not in found]
    if missing:
        raise KeyError(f"no submodule named {missing[0]!r}")
    record: dict[str, torch.Tensor] = {}
    handles = [found[name].register_forward_hook(
        lambda _module, _inputs, output, name=name: record.__setitem__(name, _first_tensor(output)))
        for name in names]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def teacher_targets(teacher: nn.Module, batch: Batch, hidden_names: list[str]):
    """The teacher's outputs and its named hidden states for one batch, without gradients."""
    with torch.no_grad(), recording(teacher, hidden_names) as hidden:
        outputs = teacher(*batch.inputs)
    return outputs, dict(hidden)


class Projections(nn.Module):
    """Learned maps from a student hidden state to the teacher's width: a linear layer for
    (batch, [positions,] features) states, a 1×1 convolution for (batch, channels, h, w) maps.
    With `shared`, pairs of the same shape use one map (the paper's shared projections).
    Identity at the start where the widths agree (a student made of the teacher's own layers)."""

    def __init__(self, shapes: list[tuple[str, torch.Size, torch.Size]], shared: bool):
        super().__init__()
        self.key_of: dict[str, str] = {}
        self.maps = nn.ModuleDict()
        for student_name, student_shape, teacher_shape in shapes:
            conv = len(student_shape) == 4
            s, t = (student_shape[1], teacher_shape[1]) if conv else (student_shape[-1], teacher_shape[-1])
            key = f"{'conv' if conv else 'linear'}_{s}_{t}" if shared else student_name.replace(".", "_")
            self.key_of[student_name] = key
            if key not in self.maps:
                layer = nn.Conv2d(s, t, 1) if conv else nn.Linear(s, t)
                with torch.no_grad():
                    layer.bias.zero_()
                    if s == t:
                        layer.weight.copy_(torch.eye(s).reshape(layer.weight.shape))
                self.maps[key] = layer

    def forward(self, student_name: str, state: torch.Tensor) -> torch.Tensor:
        return self.maps[self.key_of[student_name]](state)


# ---- data ------------------------------------------------------------------------------------------

def batches_from_arrays(arrays: list[np.ndarray], batch_size: int, seed: int, labels: np.ndarray | None = None,
                        mask_index: int | None = None, trim_to_mask: bool = False) -> Iterator[Batch]:
    """Endless shuffled batches over samples given as arrays (batch first), one epoch after another.
    `mask_index` names the input that is the attention mask; `trim_to_mask` cuts every sequence
    input to the longest real length in the batch (padding costs time and changes nothing)."""
    generator = np.random.default_rng(seed)
    count = len(arrays[0])
    if count == 0:
        raise ValueError("no samples to train on")
    while True:
        order = generator.permutation(count)
        for start in range(0, count - min(batch_size, count) + 1, batch_size):
            rows = order[start:start + batch_size]
            inputs = [torch.from_numpy(np.ascontiguousarray(a[rows])) for a in arrays]
            mask = inputs[mask_index] if mask_index is not None else None
            if mask is not None and trim_to_mask:
                length = max(1, int(mask.sum(1).max()))
                if not mask[:, length:].any():  # padding on the right only (a left-padded batch stays whole)
                    inputs = [x[:, :length] if x.dim() >= 2 and x.shape[1] == mask.shape[1] else x for x in inputs]
                    mask = inputs[mask_index]
            yield Batch(inputs=tuple(inputs), mask=mask,
                        labels=None if labels is None else torch.from_numpy(labels[rows]))


def paired_batches(teacher_arrays: list[np.ndarray], student_arrays: list[np.ndarray], batch_size: int, seed: int,
                   mask_index: int) -> Iterator[Batch]:
    """Mixed-vocabulary batches: the same texts encoded twice, by the teacher's tokenizer (`inputs`)
    and by the student's own (`student_inputs`), each cut to its own longest real length."""
    teacher_side = batches_from_arrays(teacher_arrays, batch_size, seed, mask_index=mask_index, trim_to_mask=True)
    student_side = batches_from_arrays(student_arrays, batch_size, seed, mask_index=mask_index, trim_to_mask=True)
    for teacher_batch, student_batch in zip(teacher_side, student_side):  # same seed: the same rows
        teacher_batch.student_inputs, teacher_batch.student_mask = student_batch.inputs, student_batch.mask
        yield teacher_batch


# ---- the training loop -----------------------------------------------------------------------------

def train(student: nn.Module, teacher: nn.Module, batches: Iterator[Batch],
          output_loss: Callable[[object, object, Batch], torch.Tensor] | None, *, steps: int, lr: float,
          progress: Progress | None = None, hidden_pairs: list[tuple[str, str]] = (), hidden_weight: float = 1.0,
          shared_projections: bool = False, seed: int = 0, weight_decay: float = 0.01,
          after_step: Callable[[], None] | None = None, describe: str = "distilling",
          parameters: list | None = None, before_step: Callable[[int], None] | None = None,
          student_inputs: Callable[[Batch], tuple] | None = None,
          extra_loss: Callable[[dict], torch.Tensor] | None = None, extra_modules: list[nn.Module] = ()) -> Outcome:
    """Train `student` in place for `steps` updates to match `teacher` on `batches`.

    loss = output_loss(student outputs, teacher outputs, batch)
           + hidden_weight * mean over `hidden_pairs` (student submodule, teacher submodule) of the
             relative squared error between the projected student state and the teacher's.
    AdamW with a short warm-up and a cosine decay to zero (a fixed budget, spent fully). Dropout stays
    off (the student is trained in eval mode): it imitates a fixed function, and the result is the
    same for the same seed. The teacher is never changed. The projections are thrown away at the end.
    Parameters of the student with requires_grad=False stay as they are (frozen layers).

    For recovery objectives (services/engine/recovery.py): `parameters` lists what the optimizer holds
    (default: the student's parameters that require grad; a schedule that unfreezes layers passes them
    all and switches requires_grad in `before_step(step)`: AdamW skips parameters without a gradient);
    `student_inputs(batch)` gives the student other inputs than the teacher (masked ones);
    `extra_loss(state)` adds a term computed from the step's state (the batch, both models' outputs and
    recorded hidden states), with `extra_modules` (training-only heads) trained alongside; an
    `output_loss` of None leaves the output term out.
    """
    from services.engine.device import moved_to, training_device

    device = training_device()
    if device.type != "cpu":  # a job that holds a GPU (recipe `gpus`): batches go there too
        batches, describe = (batch.to(device) for batch in batches), f"{describe} on {device}"
    with moved_to(device, [student, teacher, *extra_modules]):
        return _train(student, teacher, batches, output_loss, steps=steps, lr=lr, progress=progress,
                      hidden_pairs=hidden_pairs, hidden_weight=hidden_weight, shared_projections=shared_projections,
                      seed=seed, weight_decay=weight_decay, after_step=after_step, describe=describe,
                      parameters=parameters, before_step=before_step, student_inputs=student_inputs,
                      extra_loss=extra_loss, extra_modules=extra_modules, device=device)


def _train(student, teacher, batches, output_loss, *, steps, lr, progress, hidden_pairs, hidden_weight,
           shared_projections, seed, weight_decay, after_step, describe, parameters, before_step, student_inputs,
           extra_loss, extra_modules, device) -> Outcome:
    torch.manual_seed(seed)
    np.random.seed(seed)
    teacher.eval()  # its targets are computed under no_grad: nothing of it is trained or changed
    student.eval()
    student_names = [s for s, _ in hidden_pairs]
    teacher_names = [t for _, t in hidden_pairs]

    first = next(batches)
    projections = None
    if hidden_pairs:  # one probe batch tells the shapes the projections must map between
        _, teacher_hidden = teacher_targets(teacher, first, teacher_names)
        with torch.no_grad(), recording(student, student_names) as student_hidden:
            student(*first.for_student())
        projections = Projections([(s, student_hidden[s].shape, teacher_hidden[t].shape) for s, t in hidden_pairs],
                                  shared=shared_projections).to(device)
    trainable = list(parameters) if parameters is not None else [p for p in student.parameters() if p.requires_grad]
    if projections is not None:
        trainable += list(projections.parameters())
    for module in extra_modules:
        trainable += list(module.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    outcome = Outcome(steps=steps, seconds=0.0)
    started = time.perf_counter()
    report_every = max(1, steps // 20)
    batch = first
    for step in range(steps):
        if step > 0:
            batch = next(batches)
        if before_step is not None:
            before_step(step)
        teacher_out, teacher_hidden = teacher_targets(teacher, batch, teacher_names)
        with recording(student, student_names) as student_hidden:
            student_out = student(*(student_inputs(batch) if student_inputs is not None else batch.for_student()))
        loss = torch.zeros((), device=device) if output_loss is None else output_loss(student_out, teacher_out, batch)
        if hidden_pairs and hidden_weight > 0:
            matched = [hidden_state_loss(*matched_states(projections(s, student_hidden[s]), teacher_hidden[t], batch))
                       for s, t in hidden_pairs]
            loss = loss + hidden_weight * torch.stack(matched).mean()
        if extra_loss is not None:
            loss = loss + extra_loss({"batch": batch, "student_out": student_out, "teacher_out": teacher_out,
                                      "student_hidden": student_hidden, "teacher_hidden": teacher_hidden})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], 1.0)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step()
        outcome.losses.append(float(loss.detach()))
        if progress is not None and ((step + 1) % report_every == 0 or step + 1 == steps):
            progress((step + 1) / steps, f"{describe}: step {step + 1}/{steps}, loss {outcome.final_loss:.4f}")
    outcome.seconds = time.perf_counter() - started
    student.eval()
    return outcome
