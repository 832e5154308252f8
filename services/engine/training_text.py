"""Text that MiniLM's students, recoveries and vocabulary counts train on besides the task's fitting split:
the scored paragraphs (to exclude them), the docstrings of Python's standard library, and copies of
training texts with words replaced (distill.student's replace_words)."""
from __future__ import annotations

import ast
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

# Docstring paragraphs are filtered like the pydoc task's paragraphs, so they read alike.
MIN_PARAGRAPH_CHARS = 80
MAX_EXTRA_PARAGRAPHS = 6000
# replace_words draws from this many of the vocabulary's most frequent words
EVERYDAY_WORDS = 10_000


@lru_cache(maxsize=1)
def scored_texts() -> tuple[str, ...]:
    from services.engine.tasks.pydoc_retrieval import test_pairs

    return tuple(text for _, query, answer in test_pairs() for text in (query, answer))


@lru_cache(maxsize=2)
def stdlib_paragraphs(exclude: frozenset = frozenset(), limit: int = MAX_EXTRA_PARAGRAPHS) -> list[str]:
    """Paragraphs of the docstrings of Python's standard library, read from the source files with
    `ast` (nothing is imported: some modules act on import), in a fixed order, none in `exclude`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, out = set(exclude), []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for paragraph in (ast.get_docstring(node) or "").split("\n\n"):
                text = re.sub(r"\s+", " ", paragraph).strip()
                if len(text) >= MIN_PARAGRAPH_CHARS and ">>>" not in text and text not in seen:
                    seen.add(text)
                    out.append(text)
                    if len(out) >= limit:
                        return out
    return out


def with_replaced_words(arrays: list, names: list[str], share: float, seed: int, context) -> tuple[list, int]:
    """The training samples and a copy of each in which a `share` of the real tokens,
    special ones excepted, is replaced by random frequent words and word pieces of the vocabulary (the word-replacement
    augmentation of TinyBERT): the original answers for any text, so the student also learns to read
    words that the training text never uses, as the scored text may (measured on MiniLM: the worst
    held-out paragraphs were ordinary English, "they're bill's friends from the UK", not code)."""
    import json

    import numpy as np

    from services.engine.methods.vocab_trim import tokenizer_json, frequent_words

    path = tokenizer_json(context)
    if "input_ids" not in names or path is None or not path.is_file():
        raise context.user_error("replace_words draws words from the model's tokenizer.json and swaps them into its "
                                 "input_ids; this model has no such tokenizer or input. Set replace_words to 0.")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if (spec.get("model") or {}).get("type") != "WordPiece":
        raise context.user_error("replace_words reads the most frequent words of a WordPiece (BERT-like) vocabulary; "
                                 "this model's tokenizer is of another kind. Set replace_words to 0.")
    vocab = spec["model"]["vocab"]
    words = np.array([vocab[w] for w in frequent_words(spec, EVERYDAY_WORDS)], dtype=np.int64)
    special = np.array([t["id"] for t in spec.get("added_tokens", []) if t.get("special")], dtype=np.int64)
    ids, mask = arrays[names.index("input_ids")], arrays[names.index("attention_mask")].astype(bool)
    generator = np.random.default_rng(seed + 1)
    chosen = mask & ~np.isin(ids, special) & (generator.random(ids.shape) < share)
    replaced = ids.copy()
    replaced[chosen] = generator.choice(words, size=int(chosen.sum())).astype(ids.dtype)
    copies = [replaced if name == "input_ids" else array for name, array in zip(names, arrays)]
    return [np.concatenate([a, c]) for a, c in zip(arrays, copies)], len(words)
