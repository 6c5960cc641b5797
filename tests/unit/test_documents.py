"""model/attention/documents.py and the data path's document ids: attention inside documents against each
document attended alone, per-token RoPE against megatron-core's, document ids against
megatron-core's position reset, and the compact ids under context parallelism."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from data.dataset import document_ids, slice_for_context_parallel
from model.attention.documents import (
    attended_pairs,
    block_pieces,
    cu_seqlens,
    per_token_rotary,
    segments,
)

SCALE = 0.3
EOD = 9


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sample_ids(lengths_per_sample: list[list[int]]) -> torch.Tensor:
    """[b, s] ids of samples cut into documents of the given lengths."""
    return torch.stack(
        [
            torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(lengths)])
            for lengths in lengths_per_sample
        ]
    )


def per_document_reference(q, k, v, ids):
    """Each document of each sample attended alone (causal, K/V heads repeated), concatenated."""
    rep = q.size(1) // k.size(1)
    k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
    rows = []
    for i in range(q.size(0)):
        parts = []
        for d in ids[i].unique_consecutive():
            at = (ids[i] == d).nonzero().flatten()
            a, b = int(at[0]), int(at[-1]) + 1
            parts.append(
                F.scaled_dot_product_attention(
                    q[i : i + 1, :, a:b], k[i : i + 1, :, a:b], v[i : i + 1, :, a:b], is_causal=True, scale=SCALE
                )
            )
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows)


# Two samples of 48 tokens: many short documents, one long one beside short ones.
LENGTHS = [[3, 1, 7, 5, 2, 9, 4, 6, 11], [30, 2, 16]]


@pytest.mark.parametrize("path", ["kernels", "kernels-math", "sdpa-one-per-call", "sdpa-grouped", "sdpa-all-in-one"])
def test_document_attention_equals_each_document_alone(path, monkeypatch):
    """Forward and gradients, grouped-query heads (4 on 2): the block kernels one call per document
    (the CPU's and plain math), and the SDPA segments taken with dropout, for every grouping of
    documents into masked calls. Negative control: causal attention over the packed sample differs."""
    import model.attention.documents as documents
    from model.attention.kernels import CANDIDATES, _backend_for

    if path == "kernels-math":
        monkeypatch.setitem(CANDIDATES, "cpu", ())
        _backend_for.cache_clear()
    limit = {"sdpa-one-per-call": 1, "sdpa-grouped": 8}.get(path, 512)
    monkeypatch.setattr(documents.segments, "__defaults__", (limit,))
    attention = documents.document_attention if path.startswith("kernels") else documents._segment_sdpa
    ids = sample_ids(LENGTHS)
    q = _randn(2, 4, 48, 8, seed=0).requires_grad_()
    k = _randn(2, 2, 48, 8, seed=1).requires_grad_()
    v = _randn(2, 2, 48, 8, seed=2).requires_grad_()
    dout = _randn(2, 4, 48, 8, seed=3)
    got = attention(q, k, v, ids, SCALE, 0.0)
    want = per_document_reference(q, k, v, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    packed = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    assert (packed - want).abs().max() > 0.1
    _backend_for.cache_clear()


def test_segments_group_whole_documents_up_to_the_limit():
    ids = sample_ids([[3, 1, 7, 20, 2, 2]])[0]
    assert segments(ids, limit=12) == [(0, 11, True), (11, 31, False), (31, 35, True)]
    assert segments(ids, limit=100) == [(0, 35, True)]


def test_cu_seqlens_and_attended_pairs():
    ids = sample_ids([[3, 1, 4], [8]])
    lengths, longest = cu_seqlens(ids)
    assert lengths.tolist() == [0, 3, 4, 8, 16] and longest == 8
    assert attended_pairs(ids) == 6 + 1 + 10 + 36


def test_block_pieces_keep_only_shared_documents():
    # queries: chunk of ids [2, 2, 3, 3]; keys (earlier): [0, 1, 2, 2] -> rows of doc 2 x keys of doc 2
    query_ids = torch.tensor([[9, 9, 2, 2, 3, 3]])  # rows 2: onward are the block's
    key_ids = torch.tensor([[0, 1, 2, 2]])
    assert block_pieces(query_ids, key_ids, slice(2, None), slice(None), False) == [
        (0, slice(2, 4), slice(2, 4), False)
    ]
    # no shared document: skipped
    assert block_pieces(torch.tensor([[3, 3]]), key_ids, slice(None), slice(None), False) == []
    # diagonal: one causal piece per document
    assert block_pieces(key_ids, key_ids, slice(None), slice(None), True) == [
        (0, slice(0, 1), slice(0, 1), True),
        (0, slice(1, 2), slice(1, 2), True),
        (0, slice(2, 4), slice(2, 4), True),
    ]


def test_document_ids_match_megatron_position_reset():
    """A document ends at its EOD: ids step where megatron-core's reset positions restart at 0."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = torch.tensor([5, EOD, 4, 4, 4, EOD, EOD, 7, 8, EOD, 1])
    ids = document_ids(tokens, EOD)
    assert ids.tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 4] and ids.dtype == torch.int32
    _, _, positions = _get_ltor_masks_and_position_ids(tokens, EOD, True, False, False, False)
    starts = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]]
    assert [t for t in range(len(positions)) if positions[t] == 0] == starts


def test_context_parallel_slices_keep_document_ids_whole():
    batch = {"tokens": torch.arange(16).view(2, 8), "document_ids": torch.arange(16, dtype=torch.int32).view(2, 8)}
    sliced = slice_for_context_parallel(batch, cp_rank=1, cp_size=2)
    assert sliced["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert sliced["document_ids"] is batch["document_ids"]


def test_per_token_rotary_equals_megatron_at_sample_positions_and_restarts():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from upstream import cpu

    with cpu.applied():
        rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000)
    whole = torch.cat((torch.outer(torch.arange(12.0), rope.inv_freq),) * 2, dim=-1)[:, None, None, :]  # get_emb
    positions = torch.stack([torch.arange(12), torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 6])])
    emb = per_token_rotary(rope, positions)
    assert emb.shape == (12, 2, 1, 16)
    assert torch.equal(emb[:, :1], whole)  # bit for bit at positions 0…s−1
    assert torch.equal(emb[3, 1], whole[0, 0]) and torch.equal(emb[11, 1], whole[6, 0])


def test_flops_count_only_the_attended_pairs():
    """MFU under data.reset_attention_mask: a step's attention FLOPs are 12 · layers · heads · head_dim per
    pair inside its documents (Σ n²/2), not per pair of the whole causal square (s²/2 a sample)."""
    import types

    from model.config import ModelConfig
    from planning.flops import attention_flops_per_pair, layer_forward_flops
    from pretrain.metrics import LoggingConfig, Metrics, document_pairs, flops_per_token

    model = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, seq_length=48)
    ids = sample_ids(LENGTHS)  # two samples of 48 tokens
    pairs = document_pairs([{"document_ids": ids[:1]}, {"document_ids": ids[1:]}])
    assert pairs == sum(n * n / 2 for lengths in LENGTHS for n in lengths)
    whole = flops_per_token(model, 128)
    per_pair = attention_flops_per_pair(model)
    metrics = Metrics(LoggingConfig(), None, 96, 48, whole, 100.0, 1, 1, 0.0, pair_flops=per_pair)
    base = dict(loss=1.0, lr=1e-3, grad_norm=1.0, updated=True, moe={})
    dense = metrics.record(1, 2, 0, types.SimpleNamespace(**base), step_time=1.0)
    masked = metrics.record(1, 2, 0, types.SimpleNamespace(**base, attention_pairs=pairs), step_time=1.0)
    assert masked["attended_fraction"] == pytest.approx(pairs / (2 * 48**2 / 2))
    # the FLOPs the masked step did not compute: the pairs outside its documents
    saved = (dense["tflops_per_device"] - masked["tflops_per_device"]) * 1e12
    assert saved == pytest.approx(per_pair * (2 * 48**2 / 2 - pairs) / 96 * 96)
    assert "attended_fraction" not in dense
    # one FLOPs model: a pair costs what planning's causal core_attn term costs per pair (s/2 pairs a
    # token), also where heads x head_dim is not the hidden size (Qwen3)
    wide = dataclasses.replace(model, head_dim=32)
    for m in (model, wide):
        core = layer_forward_flops(m, is_moe=False)["core_attn"]
        assert attention_flops_per_pair(m) == 3 * m.num_layers * core / (m.seq_length / 2)
    assert attention_flops_per_pair(wide) == 2 * per_pair
