"""Token merging (sequence.pool for text): the merge itself on small tensors and a small BERT."""
from __future__ import annotations

import pytest
import torch

from services.engine.families import token_merge


def test_duplicate_tokens_merge_first_and_sizes_add_up():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    x[0, 2] = x[0, 3]  # an exact duplicate pair: the first real merge to make
    size = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5])
    merged, merged_size = token_merge.merge_tokens(x, size, 7, metric=x)
    assert merged.shape == (2, 7, 4)
    assert merged_size.sum(1).tolist() == [8.0, 3.0]  # every original token is counted once
    assert merged_size[0].tolist() == [1, 1, 2, 1, 1, 1, 1]
    torch.testing.assert_close(merged[0, 2], x[0, 3])
    # padding goes first: a short sentence keeps its three tokens untouched
    torch.testing.assert_close(merged[1, :3], x[1, :3])


def test_a_high_rate_takes_several_rounds_and_keeps_the_weighted_mean():
    torch.manual_seed(1)
    x = torch.randn(3, 64, 8)
    size = (torch.arange(64)[None, :] < torch.tensor([[64], [40], [5]])).float()
    merged, merged_size = token_merge.merge_tokens(x, size, 8, metric=x)
    assert merged.shape == (3, 8, 8)
    # a size-weighted mean of the merged tokens is the plain mean of the real ones
    before = (x * size[..., None]).sum(1) / size.sum(1, keepdim=True)
    after = (merged * merged_size[..., None]).sum(1) / merged_size.sum(1, keepdim=True)
    torch.testing.assert_close(after, before)


def test_the_schedule_shrinks_after_the_unmerged_layers():
    assert token_merge.schedule(64, 6, 1.0, 1) == [64] * 6
    assert token_merge.schedule(64, 6, 4.0, 1) == [64, 49, 37, 28, 22, 16]
    assert token_merge.schedule(64, 6, 2.0, 3)[:3] == [64, 64, 64] and token_merge.schedule(64, 6, 2.0, 3)[-1] == 32
    assert token_merge.work_share(64, 6, 4.0, 1) == pytest.approx(216 / 384)


def test_merging_nothing_reproduces_the_bert_it_runs():
    """The layer loop with proportional attention is BERT itself when no token merges."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, attn_implementation="eager")
    bert = BertModel(config).eval()
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    types = torch.zeros_like(ids)
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        hidden, size = token_merge.forward_bert(bert, ids, mask, types, rate=1.0, merge_after=1)
        torch.testing.assert_close(hidden[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
        hidden, size = token_merge.forward_bert(bert, ids, mask, types, rate=2.0, merge_after=1)
    assert hidden.shape[1] == 5 and size.sum(1).tolist() == [10.0, 6.0]
