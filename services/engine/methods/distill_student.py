"""distill.student: a smaller model of the same kind, trained to imitate the original.

The student starts from the original's own weights (a CNN keeps its strongest channels, chosen with
Torch-Pruning; a transformer keeps evenly spaced encoder layers), then learns from the original on
the task's fitting split: its outputs (softened class scores, sentence embeddings, or per-frame
log-probabilities) and its hidden states, matched through learned projections that are used for
training only (services/engine/distill.py, after the mixed-vocabulary distillation paper).
The module the pipeline exports is changed in place into the trained student.
"""
from __future__ import annotations

from services.engine.registry import Method, Param
from services.engine.training_text import scored_texts, stdlib_paragraphs, with_replaced_words

# What the student is trained for: float weights, or the 4-bit grid of a later quantize.int4_weights step
TRAIN_FOR = ("float", "4-bit weights", "4-bit weights and embeddings")


def apply(net, params: dict, context) -> None:
    import numpy as np
    import torch

    torch.manual_seed(params["seed"])
    np.random.seed(params["seed"])
    builders = {"cnn": _distill_cnn, "text-transformer": _distill_text, "speech-transformer": _distill_speech}
    builder = builders.get(context.architecture)
    if builder is None:
        raise context.user_error(f"distill.student cannot build a smaller {context.architecture or 'model'} of this "
                                 f"kind; it works on the digits CNNs, text transformers and the speech encoder.")
    builder(net, params, context)


# ---- CNNs: fewer channels in every layer, logits and feature maps distilled ------------------------

def narrow_cnn(net, width: float, example_inputs: tuple) -> list[str]:
    """Keep `width` of the channels of every layer but the output one, the strongest by L1 norm
    (Torch-Pruning keeps the shapes consistent); the module changes in place. Returns the names of
    the hidden layers (every convolution and linear layer but the last), for matching."""
    import torch
    import torch_pruning as tp

    weighted = [(name, m) for name, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if len(weighted) < 2:
        return []
    pruner = tp.pruner.MetaPruner(net, example_inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=1.0 - width, ignored_layers=[weighted[-1][1]])
    pruner.step()
    return [name for name, _ in weighted[:-1]]


def reinitialize(net) -> None:
    """Fresh random weights (the 'trained from scratch' comparison)."""
    for module in net.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def classifier_loss(temperature: float, label_weight: float):
    """The original's softened class scores, plus the true labels where a batch has them."""
    import torch.nn.functional as F

    from services.engine import distill

    def output_loss(student_logits, teacher_logits, batch):
        # a model with several heads (digits-multitask: digit and parity) matches the original on each;
        # the labels are the first head's
        students = student_logits if isinstance(student_logits, (tuple, list)) else (student_logits,)
        teachers = teacher_logits if isinstance(teacher_logits, (tuple, list)) else (teacher_logits,)
        loss = sum(distill.soft_logit_loss(s, t, temperature) for s, t in zip(students, teachers))
        if batch.labels is not None and label_weight > 0:
            loss = loss + label_weight * F.cross_entropy(students[0], batch.labels)
        return loss

    return output_loss


def _distill_cnn(net, params, context) -> None:
    import copy

    import numpy as np

    from services.engine import distill

    fit = context.fit_set()
    teacher = copy.deepcopy(net).eval()
    before = _count(net)
    hidden = narrow_cnn(net, params["width"], context.adapter.example_inputs())
    if not hidden:
        raise context.user_error("This model has fewer than two convolution or linear layers: there is nothing to "
                                 "make narrower.")
    labels = fit.labels if isinstance(fit.labels, np.ndarray) and fit.labels.dtype.kind in "iu" else None
    output_loss = classifier_loss(params["temperature"], params["label_weight"])
    arrays = [fit.inputs[name] for name in context.adapter.input_names]
    with on_grid(net, params):
        outcome = distill.train(
            net, teacher, distill.batches_from_arrays(arrays, params["batch_size"], params["seed"], labels=labels),
            output_loss, steps=params["steps"], lr=params["lr"], progress=context.progress,
            hidden_pairs=[(name, name) for name in hidden], hidden_weight=params["hidden_weight"],
            seed=params["seed"], describe="training the student")
    used = "labels and the original's outputs" if labels is not None else "the original's outputs"
    context.notes.append(
        f"distill.student: a student with {params['width']:g} of the channels, {_millions(_count(net))} parameters "
        f"(the original has {_millions(before)}), trained {params['steps']} steps ({outcome.seconds:.0f} s) on "
        f"{len(arrays[0])} fitting samples with {used}; final loss {outcome.final_loss:.4f}.{grid_note(params)}")


# ---- text transformers: fewer encoder layers, embeddings and hidden states distilled --------------

def find_layer_list(net):
    """(dotted name, ModuleList) of the encoder's layers: the longest list of modules of one class
    (BERT's encoder.layer, DistilBERT's transformer.layer, the speech encoder's layers)."""
    import torch

    best = None
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 \
                and len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    return best


def kept_layers(total: int, keep: int) -> list[int]:
    """Evenly spaced layers from the first to the last (6 → 3 keeps 1, 4 and 6, counted from 1): the
    first reads the embeddings, the last writes what the output head reads. Measured on MiniLM before
    any training, this choice kept the embeddings closer than every other layer (cosine 0.58 vs 0.40)."""
    if keep == 1:
        return [total - 1]
    return [int(i * (total - 1) / (keep - 1) + 0.5) for i in range(keep)]


def drop_layers(net, keep: int) -> tuple[str, list[int]]:
    """Keep `keep` evenly spaced encoder layers (in place). Returns the list's name and the kept indices."""
    import torch

    name, layers = find_layer_list(net)
    indices = kept_layers(len(layers), keep)
    parent_name, _, attribute = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attribute, torch.nn.ModuleList([layers[i] for i in indices]))
    for module in net.modules():  # transformers reads the layer count from its config in places
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == len(layers):
            config.num_hidden_layers = keep
    return name, indices


def _check_layers(net, params, context) -> int:
    found = find_layer_list(net)
    if found is None:
        raise context.user_error("distill.student could not find this model's list of encoder layers, so it "
                                 "cannot build a student with fewer of them.")
    total = len(found[1])
    if params["layers"] >= total:
        raise context.user_error(f"The student must have fewer layers than the original, which has {total}; "
                                 f"set 'layers' to at most {total - 1}.")
    return total


def _distill_text(net, params, context) -> None:
    import copy

    import numpy as np
    import torch

    from services.engine import distill

    total = _check_layers(net, params, context)
    fit = context.fit_set()
    names = list(context.adapter.input_names)
    if "attention_mask" not in names:
        raise context.user_error("distill.student needs a text model that takes an attention mask.")
    texts = list(fit.extra.get("texts") or [])
    mixed = context.tokenizer_file is not None  # vocab.trim came first: the student reads its own token ids
    if mixed and not (texts and hasattr(context.adapter, "encode")):
        raise context.user_error("distill.student after vocab.trim encodes the fitting texts with both tokenizers, "
                                 "and this task has no texts to encode; put distill.student before vocab.trim.")
    described = f"{len(texts) or len(fit.inputs[names[0]])} fitting paragraphs"
    if params["extra_text"] and texts and hasattr(context.adapter, "encode") and context.model.get("id") == "minilm-l6":
        extra = stdlib_paragraphs(exclude=frozenset(scored_texts()) | frozenset(texts))
        described += f" and {len(extra)} docstring paragraphs of Python's standard library"
        texts = texts + extra
    if fit.extra.get("overlaps_scoring"):
        described += " (your data set has no second split: the student was trained on the samples it is scored on)"
    if params["replace_words"] and mixed:
        raise context.user_error("replace_words swaps token ids that the original and the student must read alike, "
                                 "and after vocab.trim they read different vocabularies; set replace_words to 0 or "
                                 "put vocab.trim after distill.student.")

    # The teacher is the original, untouched by earlier steps (a factorized or trimmed embedding would
    # otherwise cap the student at what those steps kept), when the pipeline can load it.
    teacher = (context.load_original() if context.load_original is not None else copy.deepcopy(net)).eval()
    if mixed:
        # Mixed-vocabulary distillation: the teacher reads the original token ids of its full vocabulary;
        # the student (the trimmed model's layers) reads the trimmed tokenizer's ids of the same texts.
        teacher_feed = context.adapter.encode(texts)
        student_feed = context.adapter.encode(texts, tokenizer_file=context.tokenizer_file)
        batches = distill.paired_batches([teacher_feed[n] for n in names], [student_feed[n] for n in names],
                                         params["batch_size"], params["seed"], names.index("attention_mask"))
    else:
        arrays = [fit.inputs[name] for name in names]
        if len(texts) > len(arrays[0]):  # the docstrings, encoded like the fitting split
            encoded = context.adapter.encode(texts[len(arrays[0]):])
            arrays = [np.concatenate([a, encoded[name]]) for a, name in zip(arrays, names)]
        batches = distill.batches_from_arrays(arrays, params["batch_size"], params["seed"],
                                              mask_index=names.index("attention_mask"), trim_to_mask=True)
        if params["replace_words"]:
            batches, how_many = with_replaced_words(batches, names, params["replace_words"], params["seed"], context)
            described += (f", half of each batch's texts with {100 * params['replace_words']:.0f}% of their tokens "
                          f"replaced by fresh random ones among the vocabulary's {how_many:,} most frequent words "
                          f"and word pieces")
    before = _count(teacher)
    layer_list, indices = drop_layers(net, params["layers"])
    pairs = [(f"{layer_list}.{j}", f"{layer_list}.{i}") for j, i in enumerate(indices)]
    # The embedding tables stay as they are: a few thousand paragraphs would move only the rows of the
    # tokens they contain, away from all the others; and skipping their gradients halves a step. A word
    # table an earlier step changed is the exception: a trimmed vocabulary's rows are the tokens the counted
    # texts use, and words it now spells in pieces (or reads through a stand-in) must be learned anew; a
    # factorized table (share.embedding) learns with its projection.
    from services.engine.methods.share_embedding import token_table, word_embedding

    word_table = token_table(word_embedding(net)[1])
    original_table = token_table(word_embedding(teacher)[1])
    if word_table is not None and original_table is not None and word_table.weight.shape == original_table.weight.shape \
            and not mixed:
        word_table = None  # the original's own table: frozen
    frozen = [p for m in net.modules() if isinstance(m, torch.nn.Embedding) and m is not word_table
              for p in m.parameters()]
    for parameter in frozen:
        parameter.requires_grad_(False)
    with on_grid(net, params):
        outcome = distill.train(
            net, teacher, batches,
            lambda student_out, teacher_out, batch: distill.cosine_loss(student_out, teacher_out),
            steps=params["steps"], lr=params["lr"], progress=context.progress, hidden_pairs=pairs,
            hidden_weight=params["hidden_weight"], shared_projections=True, seed=params["seed"],
            describe="training the student")
    for parameter in frozen:
        parameter.requires_grad_(True)
    how = (" from the original reading its full vocabulary while the student reads the trimmed one "
           "(mixed-vocabulary distillation)" if mixed else "")
    context.notes.append(
        f"distill.student: a student with {params['layers']} of {total} layers (the original's layers "
        f"{', '.join(str(i + 1) for i in indices)}), {_millions(_count(net))} parameters (the original has "
        f"{_millions(before)}), trained {params['steps']} steps ({outcome.seconds:.0f} s) on {described}{how}; "
        f"final loss {outcome.final_loss:.4f}.{grid_note(params)}")


def on_grid(net, params):
    """Training for 4-bit weights (`train_for`), or plain float training."""
    from contextlib import nullcontext

    from services.engine.int4_training import training_on_grid

    if params["train_for"] == "float":
        return nullcontext()
    return training_on_grid(net, int(params["block_size"]), symmetric=False,
                            embeddings=params["train_for"] == TRAIN_FOR[2])


def grid_note(params) -> str:
    if params["train_for"] == "float":
        return ""
    return (f" Trained for {params['train_for']} (blocks of {params['block_size']}): its weights already lie on the "
            f"4-bit grid of quantize.int4_weights.")


# ---- the speech encoder: fewer layers, CTC log-probs and the speaker distilled ---------------------

def _distill_speech(net, params, context) -> None:
    import copy

    from services.engine import distill

    total = _check_layers(net, params, context)
    fit = context.fit_set()
    teacher = copy.deepcopy(net).eval()
    before = _count(net)
    layer_list, indices = drop_layers(net, params["layers"])
    if hasattr(net, "pool_after"):  # pool after the same depth of the original, counted in kept layers
        net.pool_after = max(1, sum(1 for i in indices if i < teacher.pool_after))
    pairs = [(f"{layer_list}.{j}", f"{layer_list}.{i}") for j, i in enumerate(indices)]
    if hasattr(net, "trained_rates"):  # the student learns at the current rate only, not once-for-all
        net.trained_rates.fill_(float(getattr(net.pool, "rate", 1.0)))
    arrays = [fit.inputs[name] for name in context.adapter.input_names]
    batches = with_frame_masks(distill.batches_from_arrays(arrays, params["batch_size"], params["seed"]))
    with on_grid(net, params):
        outcome = distill.train(net, teacher, batches, speech_output_loss(net, params["temperature"]),
                                steps=params["steps"], lr=params["lr"],
                                progress=context.progress, hidden_pairs=pairs, hidden_weight=params["hidden_weight"],
                                shared_projections=True, seed=params["seed"], describe="training the student")
    context.notes.append(
        f"distill.student: a student with {params['layers']} of {total} encoder layers, {_millions(_count(net))} "
        f"parameters (the original has {_millions(before)}), trained {params['steps']} steps "
        f"({outcome.seconds:.0f} s) on {len(arrays[0])} fitting utterances; final loss {outcome.final_loss:.4f}."
        f"{grid_note(params)}")


def speech_output_loss(net, temperature: float):
    """The speech encoder's two outputs matched: per-frame KL between the CTC distributions (real
    frames only; padding outputs are ignored) and the speaker head's softened scores."""
    from services.engine import distill

    def output_loss(student_out, teacher_out, batch):
        (student_frames, student_speaker), (teacher_frames, teacher_speaker) = student_out, teacher_out
        real = _frame_mask(batch.inputs[1], getattr(getattr(net, "pool", None), "rate", 1), student_frames.shape[1])
        per_frame = (teacher_frames.exp() * (teacher_frames - student_frames)).sum(-1)
        frames = (per_frame * real).sum() / real.sum().clamp(min=1)
        return frames + distill.soft_logit_loss(student_speaker, teacher_speaker, temperature)

    return output_loss


def _frame_mask(lengths, rate: float, frames: int):
    """1 for the real output frames of each utterance (its length pooled at `rate`), 0 for padding."""
    import torch

    pooled = torch.ceil(lengths.double() / float(rate))
    return (torch.arange(frames, device=pooled.device)[None, :] < pooled[:, None]).float()


def with_frame_masks(batches):
    for batch in batches:  # real frames of the hidden states (layers before any pooling)
        features, lengths = batch.inputs
        batch.mask = _frame_mask(lengths, 1, features.shape[1])
        yield batch


# ---- small helpers -------------------------------------------------------------------------------

def _count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count / 1e3:.0f} k"


METHOD = Method(
    name="distill.student",
    title="Distilled student (fewer layers or channels)",
    explanation=(
        "Builds a smaller model from the original (fewer layers, or fewer channels in a CNN) and trains it for a "
        "few minutes to give the same answers as the original; it is smaller and faster, and how close it stays "
        "depends on the training budget."
    ),
    stage="torch",
    applies_to=("torch",),
    architectures=("cnn", "text-transformer", "speech-transformer"),
    params=(
        Param("steps", "int", 150, "Training steps (the budget): more steps, a closer student, a longer job. "
              "150 steps take seconds on a digits CNN and about 2 minutes on MiniLM on 2 cores.",
              minimum=1, maximum=20000, step=50),
        Param("lr", "float", 1e-3, "Learning rate of the student (AdamW, warm-up then cosine decay).",
              minimum=1e-6, maximum=0.1),
        Param("batch_size", "int", 32, "Samples per training step.", minimum=2, maximum=512, step=8),
        Param("layers", "int", 3, "Transformers: how many encoder layers the student keeps (evenly spaced, the first "
              "and the last included); must be fewer than the original's.", minimum=1, maximum=48, step=1,
              architectures=("text-transformer", "speech-transformer")),
        Param("width", "float", 0.5, "CNNs: share of the channels the student keeps in every layer "
              "(0.5 = half, about a quarter of the parameters).", minimum=0.05, maximum=0.95, step=0.05,
              architectures=("cnn",)),
        Param("hidden_weight", "float", 1.0, "Weight of matching the original's hidden states (through learned "
              "projections) beside matching its outputs; 0 matches the outputs only.", minimum=0.0, maximum=100.0),
        Param("temperature", "float", 2.0, "Softening of the class scores the student imitates (CNNs, speaker "
              "head): above 1 it also learns how the original ranks the wrong answers.", minimum=0.5, maximum=20.0,
              architectures=("cnn", "speech-transformer")),
        Param("label_weight", "float", 0.5, "CNNs: weight of the true labels of the fitting images beside the "
              "original's answers (0 = imitate the original only).", minimum=0.0, maximum=10.0,
              architectures=("cnn",)),
        Param("extra_text", "bool", True, "MiniLM: also train on docstring paragraphs of Python's standard library "
              "(none of them is a scored paragraph); the fitting split alone is 765 paragraphs.",
              architectures=("text-transformer",)),
        Param("replace_words", "float", 0.0, "Text: in half of the texts of every training batch, replace this "
              "share of the tokens by random words among the vocabulary's 20,000 most frequent, drawn afresh "
              "each time (TinyBERT's augmentation), so the student learns words the training text never uses; "
              "0 = off.",
              minimum=0.0, maximum=0.9, step=0.05, architectures=("text-transformer",)),
        Param("train_for", "choice", "float", "What the student's weights are trained for: 'float', or the 4-bit grid "
              "of a later quantize.int4_weights step (its linear layers, and with 'and embeddings' its embedding "
              "tables too), so that storing them in 4 bits loses almost nothing more (quantization-aware training).",
              choices=TRAIN_FOR),
        Param("block_size", "choice", 32, "With train_for 4-bit: weights per scale, the same as the later "
              "quantize.int4_weights step's block_size.", choices=(16, 32, 64, 128)),
        Param("seed", "int", 0, "Random seed: the same recipe and seed give the same student.",
              minimum=0, maximum=2**31 - 1),
    ),
    effect_note=("Fewer parameters, a smaller file and less time per call in proportion to the layers or channels "
                 "removed; fidelity depends on the training budget (steps) and is lower than the original's."),
    apply=apply,
)
