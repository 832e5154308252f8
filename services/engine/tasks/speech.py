"""Speech tasks on the synthesized corpus's held-out test split (services/engine/speech/corpus.py).

- `spoken-digits`: 600 strings of 3-6 digits never heard in training; the CTC output (the
  model's output `digit_log_probs`) is decoded greedily; score = 1 - digit error rate (edit
  distance over reference length, summed over the set; floored at 0).
- `speaker-id`: which of the 12 voices spoke, on those 600 digit strings plus 240 utterances of
  words that the speaker head never heard from that voice; scored on `speaker_logits`.

Inputs are fixed-length: log-mel (N, MAX_FRAMES, 80) zero-padded, plus each utterance's length.
Each EvalSet names the model output its task scores in `extra["output_name"]`.
"""
from __future__ import annotations

import numpy as np

from services.engine.speech.corpus import MAX_FRAMES, VOICES, load_corpus
from services.engine.speech.model import BLANK
from services.engine.tasks.base import EvalSet

LATENCY_BATCH = 16
DIGIT_OUTPUT = "digit_log_probs"
SPEAKER_OUTPUT = "speaker_logits"
SCORE_NAMES = {"spoken-digits": "1 - digit error rate", "speaker-id": "accuracy"}


def _split(task: str, split: str) -> EvalSet:
    """One split of the corpus as an EvalSet: digit strings for spoken-digits, every utterance for speaker-id."""
    corpus = load_corpus()
    if task == "spoken-digits":
        indices = corpus.select(split, "digits")
        labels = [str(s) for s in corpus.digits[indices]]
        output = DIGIT_OUTPUT
    elif task == "speaker-id":
        indices = corpus.select(split)
        labels = corpus.voice[indices].copy()
        output = SPEAKER_OUTPUT
    else:
        raise ValueError(f"not a speech task: {task!r}")
    features, lengths = corpus.padded(indices, MAX_FRAMES)
    return EvalSet(inputs={"features": features, "lengths": lengths}, labels=labels, latency_batch=LATENCY_BATCH,
                   extra={"output_name": output, "kind": corpus.kind[indices].copy(),
                          "data": f"{len(indices)} {'training' if split == 'train' else 'held-out test'} utterances"})


def eval_set(task: str) -> EvalSet:
    return _split(task, "test")


def fit_set(task: str) -> EvalSet:
    """The training utterances (strings the test split does not share), labelled as eval_set."""
    return _split(task, "train")


def greedy_decode(log_probs: np.ndarray, length: int) -> str:
    """Best token per frame over the first `length` frames; repeats merged, blanks dropped."""
    best = log_probs[:length].argmax(axis=-1)
    keep = (best != BLANK) & np.concatenate([[True], best[1:] != best[:-1]])
    return "".join(str(token - 1) for token in best[keep])


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def output_lengths(lengths: np.ndarray, frames_in: int, frames_out: int, rate: float | None = None) -> np.ndarray:
    """Real output frames per utterance when the model pools time at `rate` (T' = ceil(T / r)): ceil(L / r).
    Without the rate (a model of unknown provenance), the whole rate that gives T' frames; failing that,
    ceil(L T' / T), which may count one padding frame more."""
    lengths = np.asarray(lengths)
    if rate is not None:  # the same arithmetic as the model's own (speech/model.pooled_lengths)
        return np.minimum(np.ceil(lengths.astype(np.float64) / float(rate)).astype(np.int64), frames_out)
    whole = next((r for r in range(1, frames_in + 1) if -(-frames_in // r) == frames_out), None)
    if whole is not None:
        return -(-lengths // whole)
    return np.minimum(np.ceil(lengths * frames_out / frames_in - 1e-9).astype(np.int64), frames_out)


def digit_error_rate(log_probs: np.ndarray, lengths: np.ndarray, references: list[str],
                     frames_in: int = MAX_FRAMES, rate: float | None = None) -> tuple[float, list[str]]:
    """Edit distance of the greedy transcripts over the reference digits, summed over the set."""
    out_lengths = output_lengths(lengths, frames_in, log_probs.shape[1], rate)
    hypotheses = [greedy_decode(lp, n) for lp, n in zip(log_probs, out_lengths)]
    errors = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    return errors / sum(len(r) for r in references), hypotheses


def score(task: str, evaluation: EvalSet, outputs: np.ndarray) -> dict:
    if task == "spoken-digits":
        if outputs.ndim != 3:
            raise ValueError(f"spoken-digits scores the per-frame output '{DIGIT_OUTPUT}' (batch, frames, 11); "
                             f"got shape {outputs.shape}")
        rate, hypotheses = digit_error_rate(outputs, evaluation.inputs["lengths"], evaluation.labels,
                                            rate=evaluation.extra.get("pooling_rate"))
        exact = float(np.mean([h == r for h, r in zip(hypotheses, evaluation.labels)]))
        return {"score": max(0.0, 1.0 - rate), "score_name": SCORE_NAMES[task], "digit_error_rate": rate,
                "string_accuracy": exact}
    if task == "speaker-id":
        if outputs.ndim != 2 or outputs.shape[1] != len(VOICES):
            raise ValueError(f"speaker-id scores the model output '{SPEAKER_OUTPUT}' (batch, {len(VOICES)}); got "
                             f"shape {outputs.shape}: the scorer was handed another output of the model")
        right = outputs.argmax(axis=1) == evaluation.labels
        kind = evaluation.extra.get("kind")
        by_kind = {f"accuracy_{k}": float(right[kind == k].mean()) for k in ("digits", "words")
                   if kind is not None and (kind == k).any()}
        return {"score": float(right.mean()), "score_name": SCORE_NAMES[task], **by_kind}
    raise ValueError(f"not a speech task: {task!r}")


def fidelity(task: str, evaluation: EvalSet, outputs: np.ndarray, reference: np.ndarray) -> dict:
    """Agreement with the original model, counting real frames only (optional hook, see the report).

    The generic per-frame top-1 agreement also counts the zero-padded frames (about half of the
    160) and is mostly blank against blank; this one compares the real frames, and adds the share
    of utterances whose greedy transcript is unchanged.
    """
    if outputs.ndim == 2:  # speaker logits
        same = outputs.argmax(axis=-1) == reference.argmax(axis=-1)
        return {"fidelity": float(same.mean()), "fidelity_worst": float(same.min(initial=True))}
    pooling_rate = (getattr(evaluation, "extra", None) or {}).get("pooling_rate")
    if outputs.shape[1] != reference.shape[1]:
        return _transcript_fidelity(evaluation.inputs["lengths"], outputs, reference, pooling_rate)
    lengths = output_lengths(evaluation.inputs["lengths"], MAX_FRAMES, outputs.shape[1])
    same = outputs.argmax(axis=-1) == reference.argmax(axis=-1)
    real = np.arange(outputs.shape[1])[None, :] < lengths[:, None]
    per_utterance = (same & real).sum(axis=1) / lengths
    transcripts = [greedy_decode(o, n) == greedy_decode(r, n) for o, r, n in zip(outputs, reference, lengths)]
    return {"fidelity": float((same & real).sum() / real.sum()), "fidelity_worst": float(per_utterance.min()),
            "transcript_agreement": float(np.mean(transcripts))}


def _transcript_fidelity(lengths: np.ndarray, outputs: np.ndarray, reference: np.ndarray,
                         rate: float | None = None) -> dict:
    """A model that pools time (sequence.pool) has fewer output frames than the original: frames no
    longer line up, so agreement is measured on what each says, its greedy transcript: per utterance
    1 - edit distance / the original's transcript length (floored at 0)."""
    ours = output_lengths(lengths, MAX_FRAMES, outputs.shape[1], rate)
    theirs = output_lengths(lengths, MAX_FRAMES, reference.shape[1])
    said = [greedy_decode(o, n) for o, n in zip(outputs, ours)]
    original = [greedy_decode(r, n) for r, n in zip(reference, theirs)]
    per_utterance = [max(0.0, 1.0 - edit_distance(a, b) / max(1, len(b))) for a, b in zip(said, original)]
    return {"fidelity": float(np.mean(per_utterance)), "fidelity_worst": float(np.min(per_utterance)),
            "transcript_agreement": float(np.mean([a == b for a, b in zip(said, original)]))}
