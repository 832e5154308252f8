"""pydoc-retrieval: a paragraph of Python's own help text must retrieve the next paragraph of the
same topic among all candidates. Recall@1 is the score; MRR is reported beside it.

Paragraphs come from `pydoc_data.topics` (shipped with Python): split on blank lines, whitespace
collapsed, at least 80 characters. Neighbouring paragraphs of one topic make a pair; a seeded
shuffle picks TEST_PAIRS of them, fixed for everyone.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache

import numpy as np

from services.engine.tasks.base import EvalSet

MIN_CHARS = 80
TEST_PAIRS = 256
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def pairs() -> list[tuple[str, str, str]]:
    """(topic, paragraph, next paragraph) for every neighbouring pair."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        paragraphs = [re.sub(r"\s+", " ", p).strip() for p in topics[topic].split("\n\n")]
        paragraphs = [p for p in paragraphs if len(p) >= MIN_CHARS]
        out.extend((topic, a, b) for a, b in zip(paragraphs, paragraphs[1:]))
    return out


@lru_cache(maxsize=1)
def test_pairs() -> list[tuple[str, str, str]]:
    chosen = list(pairs())
    random.Random(SPLIT_SEED).shuffle(chosen)
    return chosen[:TEST_PAIRS]


def eval_set(task: str = "pydoc-retrieval") -> EvalSet:
    """Queries first, then their neighbours (the candidates), in one batch-first feed."""
    from services.engine.families.minilm import encode

    chosen = test_pairs()
    texts = [query for _, query, _ in chosen] + [answer for _, _, answer in chosen]
    return EvalSet(inputs=encode(texts), labels=None, latency_batch=32,
                   extra={"pairs": len(chosen), "texts": texts})


@lru_cache(maxsize=1)
def fit_paragraphs() -> list[str]:
    """Every paragraph that occurs in no test pair (neither as query nor as answer), in a fixed order."""
    scored = {text for _, query, answer in test_pairs() for text in (query, answer)}
    seen, out = set(), []
    for _, query, answer in pairs():
        for text in (query, answer):
            if text not in scored and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def fit_set(task: str = "pydoc-retrieval") -> EvalSet:
    """Paragraphs that no score is computed on: what trimming, calibration and recovery may see."""
    from services.engine.families.minilm import encode

    texts = fit_paragraphs()
    return EvalSet(inputs=encode(texts), labels=None, latency_batch=32,
                   extra={"texts": texts, "data": f"{len(texts)} help paragraphs outside the scored pairs"})


def score(task: str, evaluation: EvalSet, outputs: np.ndarray) -> dict:
    n = evaluation.extra["pairs"]
    queries, candidates = outputs[:n], outputs[n:]
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    candidates = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    similarity = queries @ candidates.T
    # rank of the right answer: 1 + how many candidates score higher than it
    right = similarity[np.arange(n), np.arange(n)]
    ranks = 1 + (similarity > right[:, None]).sum(axis=1)
    return {"score": float(np.mean(ranks == 1)), "score_name": "recall@1", "mrr": float(np.mean(1.0 / ranks))}
