"""Which samples to label (or calibrate on) when only a few may be: multi-task active learning.

A user with much unlabelled data can afford to label a little (`recovery.label_budget`); the
strategy (`recovery.selection`, `quantize.static`'s `calibration_selection`) decides which samples:

- `random`: a seeded uniform draw, the baseline every other strategy has to beat.
- `uncertainty`: the samples whose class scores (the model's first output) have the highest entropy.
- `inconsistency`: on a model with two coupled heads (`digits-multitask`: the digit and its parity),
  the samples where the heads break their coupling most, as the multi-task active-learning study
  scores object detection against segmentation: the coarse distribution the fine head implies
  (p_fine @ coupling) against the coarse head's own, by Jensen-Shannon divergence. A single-task
  model has no second head: there it is the disagreement (Jensen-Shannon divergence of the class
  scores) between the compressed and the original model, which needs no labels either.

Scores are computed once, before training, by the model as compressed (a sample is labelled before it
is used). A ranked pick is not the plain top of the scores: the samples are grouped into as many
clusters as the budget (k-means over the original model's outputs, whose answers compression has
not damaged), and each cluster gives its best-scoring sample among the half nearest its centre.
Why, measured on digits-multitask pruned 90 % and recovered with budgeted labels (a prototype of
bench/active_learning.py, 200 steps, 8 seeds; labels needed to reach 95 % of the accuracy with all
1257 labels): random 30; a plain top-k never got there (inconsistency 0.68 accuracy with 400 labels,
uncertainty 0.91: the budget fills with near-duplicates of the few digits the pruned model confuses
most, and training on those alone skews it); best score per cluster 23 (inconsistency) and 31
(uncertainty); best score among the half nearest the centre 19 and 14. Budgets here are a few dozen
samples, where covering the data matters more than any score (the most typical sample of each cluster,
ignoring the score, needed 13): the half-nearest-centre rule keeps the picks typical while the score
still chooses among them.

numpy only at import (recipe validation in the web process reads STRATEGIES and budget_count);
torch and onnxruntime are imported inside the functions that run models.
"""
from __future__ import annotations

import numpy as np

STRATEGIES = ("random", "uncertainty", "inconsistency")
EXPLANATIONS = {
    "random": "Label a random share of the samples: every sample is as likely to be chosen.",
    "uncertainty": "Label the samples the model is least sure about (its class scores are spread out the most).",
    "inconsistency": "Label the samples where the answers disagree: the compressed model and the original, or, "
                     "on a model with two linked answers, those two (a digit called 3 but said to be even). "
                     "Needs no labels.",
}
_EPSILON = 1e-12


def budget_count(label_budget, available: int) -> int:
    """How many samples a budget means: a fraction in (0, 1] of `available` (a float: 1.0 is all of
    them), or a whole count >= 1 (an int: 1 is one sample; a whole float above 1 counts too, as JSON may
    write 100.0). Raises ValueError with one sentence for anything else, a share that rounds to no
    sample, or more samples than the data has."""
    if isinstance(label_budget, bool) or not isinstance(label_budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"The label budget must be a fraction of the samples (such as 0.1) or a count (such as "
                         f"100); got {label_budget!r}.")
    budget = float(label_budget)
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"The label budget must be more than zero; got {label_budget!r}.")
    if isinstance(label_budget, (float, np.floating)) and budget <= 1:
        count = int(round(budget * available))
        if count < 1:
            raise ValueError(f"A label budget of {label_budget} of {available} samples is less than one sample; "
                             f"ask for a larger share, or for a count such as 10.")
        return count
    if budget != int(budget):
        raise ValueError(f"A label budget above 1 is a count of samples and must be whole; got {label_budget!r} "
                         f"(write a fraction between 0 and 1 for a share of the data).")
    if int(budget) > available:
        raise ValueError(f"The label budget asks for {int(budget)} samples, but the data has only {available}; "
                         f"ask for at most {available}, or for a fraction such as 0.5.")
    return int(budget)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _per_sample(values: np.ndarray) -> np.ndarray:
    """One number per sample: per-position scores (frames, tokens) are averaged."""
    return values.reshape(len(values), -1).mean(axis=1)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p + _EPSILON)).sum(axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence over the last axis: symmetric, finite and at most log 2, so one
    confidently wrong sample cannot dominate the ranking as it can under KL."""
    middle = (p + q) / 2
    return entropy(middle) - (entropy(p) + entropy(q)) / 2


def scores(strategy: str, outputs: list[np.ndarray], original_outputs: list[np.ndarray] | None = None,
           coupling: np.ndarray | None = None) -> np.ndarray:
    """Per sample, how much labelling it is worth under `strategy` (higher first). `outputs` are the
    model's outputs (the first: class scores); `coupling` (fine classes x coarse classes, 0/1) says
    which coarse class each fine class implies, for a model whose second output is the coarse head."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown selection {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    first = outputs[0]
    if strategy == "random":
        return np.zeros(len(first))
    if strategy == "uncertainty":
        return _per_sample(entropy(softmax(first)))
    if coupling is not None and len(outputs) >= 2:
        implied = softmax(first) @ np.asarray(coupling, dtype=np.float64)
        return _per_sample(js_divergence(implied, softmax(outputs[1])))
    if original_outputs is None:
        raise ValueError("Inconsistency on a model with one head compares it with the original model, and no "
                         "original outputs were given.")
    ours, theirs = softmax(first), softmax(original_outputs[0])
    if ours.shape != theirs.shape:  # fewer positions (pooled frames): each sample's average distribution
        ours, theirs = (p.reshape(len(p), -1, p.shape[-1]).mean(axis=1) for p in (ours, theirs))
    return _per_sample(js_divergence(ours, theirs))


def pick(strategy: str, count: int, sample_count: int, scores: np.ndarray | None = None, seed: int = 0,
         representation: np.ndarray | None = None) -> np.ndarray:
    """Exactly `count` distinct sample indices, sorted. `random`: a seeded draw. Others: the highest
    scores (ties broken by the seed); with a `representation` (one row per sample, such as the original
    model's outputs) the samples are first grouped into `count` clusters (k-means, seeded) and each
    cluster gives the best-scoring sample among its half nearest the cluster's centre, so that the
    picks cover the data and are typical of it as well as informative (see the module's docstring)."""
    if not 1 <= count <= sample_count:
        raise ValueError(f"Cannot pick {count} of {sample_count} samples.")
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return np.sort(rng.choice(sample_count, size=count, replace=False))
    if scores is None or len(scores) != sample_count:
        raise ValueError(f"Selection {strategy!r} needs one score per sample.")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((rng.random(sample_count), -scores))  # best first, ties in a seeded order
    if representation is None or count == sample_count:
        return np.sort(order[:count])
    chosen = _per_cluster_best(np.asarray(representation, dtype=np.float64).reshape(sample_count, -1), scores,
                               count, seed)
    if len(chosen) < count:  # fewer distinct clusters than asked (duplicate samples): the best of the rest
        rest = order[~np.isin(order, chosen)]
        chosen = np.concatenate([chosen, rest[:count - len(chosen)]])
    return np.sort(chosen)


def _per_cluster_best(points: np.ndarray, scores: np.ndarray, count: int, seed: int) -> np.ndarray:
    import warnings

    from sklearn.cluster import KMeans

    with warnings.catch_warnings():  # duplicate points: fewer distinct clusters, topped up by the caller
        warnings.simplefilter("ignore")
        kmeans = KMeans(n_clusters=count, n_init=1, max_iter=100, random_state=seed).fit(points)
    distance = ((points - kmeans.cluster_centers_[kmeans.labels_]) ** 2).sum(axis=1)
    chosen = []
    for cluster in range(count):
        members = np.flatnonzero(kmeans.labels_ == cluster)
        if len(members):
            typical = members[np.argsort(distance[members], kind="stable")[:(len(members) + 1) // 2]]
            chosen.append(typical[np.argmax(scores[typical])])
    return np.array(chosen, dtype=np.int64)


def representation(outputs: list[np.ndarray]) -> np.ndarray:
    """One row per sample from a model's outputs: every output's last axis (class scores, an embedding),
    averaged over any positions (frames, tokens), side by side."""
    return np.concatenate([o.reshape(len(o), -1, o.shape[-1]).mean(axis=1) for o in outputs], axis=1)


def torch_outputs(net, arrays: list[np.ndarray], batch: int = 256) -> list[np.ndarray]:
    """Every output of a PyTorch model over the samples (inputs in the adapter's order), in eval mode
    without gradients; the model's training mode is put back after."""
    import torch

    was_training = net.training
    net.eval()
    collected: list[list[np.ndarray]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(arrays[0]), batch):
                out = net(*[torch.from_numpy(np.ascontiguousarray(a[start:start + batch])) for a in arrays])
                out = out if isinstance(out, (tuple, list)) else (out,)
                if not collected:
                    collected = [[] for _ in out]
                for bucket, value in zip(collected, out):
                    bucket.append(value.detach().float().numpy())
    finally:
        net.train(was_training)
    return [np.concatenate(bucket) for bucket in collected]


def onnx_outputs(path, feed: dict, batch: int = 256) -> list[np.ndarray]:
    """Every output of an ONNX model over the samples of `feed` (input name -> array), in batches."""
    from services.engine import measure

    sess = measure.session(path)
    total = len(next(iter(feed.values())))
    runs = [sess.run(None, {name: values[start:start + batch] for name, values in feed.items()})
            for start in range(0, total, batch)]
    return [np.concatenate([run[i] for run in runs]) for i in range(len(runs[0]))]


def _drawn(count: int, available: int, seed: int) -> str:
    return f"{count:,} of {available:,} samples drawn at random (seed {seed})"


def choose_from_outputs(strategy: str, count: int, outputs: list[np.ndarray],
                        original_outputs: list[np.ndarray] | None = None, coupling: np.ndarray | None = None,
                        seed: int = 0) -> tuple[np.ndarray, str]:
    """`count` sample indices and a sentence for the run saying how they were chosen. Ranked picks are
    spread over clusters of the original model's outputs (the model's own when the original's are not
    given). Disagreement with an original that is the same model (nothing compressed it yet) is zero
    everywhere: that case ranks by uncertainty instead, and the sentence says so."""
    n = len(outputs[0])
    if strategy == "random":
        return pick("random", count, n, seed=seed), _drawn(count, n, seed)
    coupled = coupling is not None and len(outputs) >= 2
    used, why = strategy, ""
    if strategy == "inconsistency" and not coupled:
        if original_outputs is None:
            raise ValueError("Inconsistency on a model with one head compares it with the original model, and no "
                             "original outputs were given.")
        if outputs[0].shape == original_outputs[0].shape and np.allclose(outputs[0], original_outputs[0], atol=1e-6):
            used, why = "uncertainty", ("; the model still answers as the original does, so there was no "
                                        "disagreement to rank by and the most uncertain samples were taken instead")
    ranked = scores(used, outputs, original_outputs, coupling)
    chosen = pick(used, count, n, ranked, seed, representation(original_outputs or outputs))
    criterion = {"uncertainty": "the most uncertain class scores",
                 "inconsistency": "the largest disagreement between the two heads" if coupled
                 else "the largest disagreement with the original model"}[used]
    return chosen, (f"{count:,} of {n:,} samples chosen by {strategy}: in each of {count:,} groups of similar samples, "
                    f"the one with {criterion}{why}")


def choose(strategy: str, label_budget, arrays: list[np.ndarray], student, original=None,
           coupling: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The samples whose labels recovery may use: `label_budget` of the samples in `arrays` (the fitting
    split's inputs, in the adapter's order), ranked by `student` (the compressed PyTorch model) and,
    for inconsistency without a coupling, `original`. Sorted distinct indices."""
    return choose_with_note(strategy, label_budget, arrays, student, original, coupling, seed)[0]


def choose_with_note(strategy: str, label_budget, arrays: list[np.ndarray], student, original=None,
                     coupling: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, str]:
    """As `choose`, with the sentence for the run's notes."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown selection {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    available = len(arrays[0])
    count = budget_count(label_budget, available)
    if strategy == "random":  # no model needs to run
        return pick("random", count, available, seed=seed), _drawn(count, available, seed)
    outputs = torch_outputs(student, arrays)
    needs_original = strategy == "inconsistency" and (coupling is None or len(outputs) < 2)
    if needs_original and original is None:
        raise ValueError("Inconsistency on a model with one head compares it with the original model, and no "
                         "original model was given.")
    # the original's outputs also place the samples in groups (its answers are not damaged by compression)
    original_outputs = torch_outputs(original, arrays) if original is not None else None
    return choose_from_outputs(strategy, count, outputs, original_outputs, coupling, seed)
