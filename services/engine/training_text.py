"""Text that MiniLM's students, recoveries and vocabulary counts train on besides the task's fitting split:
the scored paragraphs (to exclude them), the docstrings of Python's standard library, and training
batches with words replaced (distill.student's replace_words)."""
from __future__ import annotations

import ast
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

# Docstring paragraphs are filtered like the pydoc task's paragraphs, so they read alike.
MIN_PARAGRAPH_CHARS = 80
MAX_EXTRA_PARAGRAPHS = 6000
# replace_words draws from this many of the vocabulary's most frequent words and pieces (27,529 have two or
# more characters). 10,000 left out words of MiniLM's worst held-out paragraph ("descriptions", "illustration"):
# their factorized rows never learned; with 20,000 that paragraph rose from 0.885 to 0.939.
REPLACEMENT_WORDS = 20_000


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


class WordReplacer:
    """Swaps a share of the real tokens of token-id inputs, special ones excepted, for random frequent words
    and word pieces of the model's WordPiece vocabulary (the word-replacement augmentation of TinyBERT)."""

    def __init__(self, names: list[str], context):
        import json

        import numpy as np

        from services.engine.methods.vocab_trim import frequent_words, tokenizer_json

        path = tokenizer_json(context)
        if "input_ids" not in names or "attention_mask" not in names or path is None or not path.is_file():
            raise context.user_error("replace_words draws words from the model's tokenizer.json and swaps them "
                                     "into its input_ids; this model has no such tokenizer or input. Set "
                                     "replace_words to 0.")
        spec = json.loads(path.read_text(encoding="utf-8"))
        if (spec.get("model") or {}).get("type") != "WordPiece":
            raise context.user_error("replace_words reads the most frequent words of a WordPiece (BERT-like) "
                                     "vocabulary; this model's tokenizer is of another kind. Set replace_words to 0.")
        vocab = spec["model"]["vocab"]
        self.words = np.array([vocab[w] for w in frequent_words(spec, REPLACEMENT_WORDS)], dtype=np.int64)
        self.special = np.array([t["id"] for t in spec.get("added_tokens", []) if t.get("special")], dtype=np.int64)
        self.ids_at, self.mask_at = names.index("input_ids"), names.index("attention_mask")

    def replaced(self, ids, mask, share: float, generator):
        """A copy of `ids` (numpy, batch first) with about `share` of its real tokens replaced."""
        import numpy as np

        chosen = mask.astype(bool) & ~np.isin(ids, self.special) & (generator.random(ids.shape) < share)
        out = ids.copy()
        out[chosen] = generator.choice(self.words, size=int(chosen.sum())).astype(ids.dtype)
        return out


def with_replaced_words(batches: Iterator, names: list[str], share: float, seed: int, context) -> tuple[Iterator, int]:
    """The training batches, with a `share` of the tokens of half of each batch's texts (chosen afresh in every
    batch) replaced by fresh random draws among the vocabulary's frequent words: the original still answers for
    the changed text, so the student also learns words that the training text never uses, as the scored text
    may (measured on MiniLM: the worst held-out paragraphs were ordinary English, "they're bill's friends from
    the UK", not code). Drawn anew each time, every word is seen in ever new contexts, not a fixed few."""
    import numpy as np
    import torch

    replacer = WordReplacer(names, context)
    generator = np.random.default_rng(seed + 1)

    def replaced_batches():
        for batch in batches:
            inputs = list(batch.inputs)
            ids, mask = inputs[replacer.ids_at].numpy(), inputs[replacer.mask_at].numpy()
            rows = generator.random(len(ids)) < 0.5
            ids = ids.copy()
            ids[rows] = replacer.replaced(ids[rows], mask[rows], share, generator)
            inputs[replacer.ids_at] = torch.from_numpy(ids)
            batch.inputs = tuple(inputs)
            yield batch

    return replaced_batches(), len(replacer.words)
