"""Token merging for text transformers: sequence.pool's counterpart of the speech encoder's frame pooling.

After the first `merge_after` encoder layers, similar tokens are merged a little before every
layer, so that the last layer runs on ceil(T / rate) tokens instead of T (T is the padded length,
64 for minilm-l6). It follows Token Merging (ToMe, Bolya et al. 2023), which needs no training:

- bipartite soft matching: the real tokens are split alternately into two sets; each token of the
  first set finds its most similar token of the second (cosine of their attention keys), and the most
  similar pairs are merged (a size-weighted average), at most half the tokens per round, so a
  rate above 2 takes several rounds;
- every token carries its *size*, the number of original tokens it stands for; later layers add
  log(size) to the attention scores (proportional attention), so a merged token is attended to as
  much as the tokens it replaced, and the sentence embedding is the size-weighted mean, which at
  rate 1 is exactly the original mean over real tokens.

Padding tokens have size 0: they are dropped first and cost nothing, so a batch of short sentences
padded to 64 loses nothing until the rate asks for fewer tokens than its longest sentence has.
Everything is a sort, a comparison or a matrix product, which exports to ONNX with the batch
dynamic (the padded length is fixed by the tokenizer).
"""
from __future__ import annotations

import math

import torch
from torch import nn

NEGATIVE = -1e4  # an additive attention score that softmax turns into (almost) zero weight


def attention_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) token sizes -> (B, 1, 1, T) additive scores: log(size), padding masked out."""
    bias = torch.where(size > 0, torch.log(size.clamp(min=1.0)), torch.full_like(size, NEGATIVE))
    return bias[:, None, None, :].to(dtype)


def _merge_round(x: torch.Tensor, size: torch.Tensor, keep: int, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of bipartite matching: T tokens -> `keep` tokens (keep >= ceil(T / 2))."""
    batch, tokens, _ = x.shape
    positions = torch.arange(tokens, device=x.device)
    real = size > 0
    # Real tokens first, in their order; padding after (a stable sort on "is padding").
    order = torch.argsort((~real).to(torch.int64) * tokens + positions, dim=1)
    x = torch.gather(x, 1, order[..., None].expand_as(x))
    metric = torch.gather(metric, 1, order[..., None].expand_as(metric))
    size = torch.gather(size, 1, order)
    real = size > 0
    n_real = real.sum(1, keepdim=True)
    to_remove = (n_real - keep).clamp(min=0)  # real tokens that must merge in this round, per sentence

    is_source = real & (positions % 2 == 0)  # candidates to merge away
    is_target = real & (positions % 2 == 1)  # tokens they may merge into
    unit = nn.functional.normalize(metric, dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (B, T, T)
    similarity = similarity.masked_fill(~is_target[:, None, :], -2.0)
    best, match = similarity.max(dim=-1)  # each token's most similar target
    best = torch.where(is_source, best, torch.full_like(best, -3.0))
    # The to_remove most similar sources of each sentence merge; the other tokens stay.
    rank = torch.argsort(torch.argsort(best, dim=1, descending=True), dim=1)
    merges = is_source & (rank < to_remove)
    stays = ~merges

    # Slot of each staying token: its index among the staying tokens (real ones come first);
    # padding past `keep` has no slot and vanishes (its size is 0 anyway).
    slot_of_staying = torch.cumsum(stays.to(torch.int64), dim=1) - 1
    slot = torch.where(merges, torch.gather(slot_of_staying, 1, match), slot_of_staying)
    slots = torch.arange(keep, device=x.device)
    assign = ((slot[:, None, :] == slots[None, :, None]) & (stays | merges)[:, None, :]).to(x.dtype)  # (B, keep, T)
    weighted = assign * size[:, None, :].to(x.dtype)
    new_size = weighted.sum(-1)
    merged = weighted @ x / new_size.clamp(min=1e-6)[..., None]
    new_metric = weighted @ metric / new_size.clamp(min=1e-6)[..., None]
    return merged, new_size, new_metric


def merge_tokens(x: torch.Tensor, size: torch.Tensor, keep: int, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) hidden states, (B, T) sizes -> (B, keep, D) and their sizes, matching tokens by `metric`."""
    length = x.shape[1]
    while length > keep:
        length = max(keep, math.ceil(length / 2))
        x, size, metric = _merge_round(x, size, length, metric)
    return x, size


def schedule(tokens: int, layers: int, rate: float, merge_after: int) -> list[int]:
    """Tokens each layer runs on: T for the first `merge_after` layers, then shrinking geometrically
    so that the last layer runs on ceil(T / rate). Merging a little before every layer (ToMe's
    schedule) kept MiniLM's embeddings far closer than merging everything at once for the same
    work (measured: 0.990 against 0.917 mean cosine at about 70 % of the token-layers)."""
    merging = max(1, layers - merge_after)
    return [tokens if index < merge_after else
            max(1, math.ceil(tokens / rate ** ((index - merge_after + 1) / merging)))
            for index in range(layers)]


def work_share(tokens: int, layers: int, rate: float, merge_after: int) -> float:
    """The share of the original token-layers still computed (attention grows faster, so the real
    saving is a little larger)."""
    return sum(schedule(tokens, layers, rate, merge_after)) / (tokens * layers)


def forward_bert(bert: nn.Module, input_ids, attention_mask, token_type_ids, rate: float,
                 merge_after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Hugging Face BERT's embeddings and layers run here, merging tokens before each layer past
    `merge_after`; returns the last hidden states and the tokens' sizes. Used only at a rate above
    1: at rate 1 the SentenceEncoder calls BERT as it is."""
    hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    size = attention_mask.to(hidden.dtype)
    layers = bert.encoder.layer
    for layer, keep in zip(layers, schedule(hidden.shape[1], len(layers), rate, merge_after)):
        if keep < hidden.shape[1]:
            # ToMe matches tokens by their attention keys: more telling than the hidden states,
            # whose few outlier dimensions make every pair of tokens look alike.
            hidden, size = merge_tokens(hidden, size, keep, layer.attention.self.key(hidden))
        out = layer(hidden, attention_mask=attention_bias(size, hidden.dtype))
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden, size
