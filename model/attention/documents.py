"""Documents inside packed samples: attention that stops at document boundaries, from per-token
document ids (never an s x s mask), and RoPE at per-token positions.

Document ids [b, s] (int32, non-decreasing along each sample; data/dataset.py:document_ids) reach
the core attention through megatron-core's `attention_mask` argument, which passes it untouched
from GPTModel.forward to every layer's core attention (a floating or boolean tensor there would be
a real mask: refused). Each attention turns them into spans of whole documents:

- one process (and Ulysses' all-to-all, which sees the whole sequence): each document one causal
  call of the ring's verified block kernels, written into one output (the memory of one causal SDPA
  call). With attention dropout (which those kernels lack): SDPA calls over segments of consecutive
  documents up to SEGMENT_TOKENS tokens, a segment of several with its [n, n] block-diagonal causal
  mask (memory O(SEGMENT_TOKENS²), never O(s²)). On CUDA with flash-attn installed (fp16/bf16), one
  flash_attn_varlen_func call over all documents instead.
- the ring (model/attention/ring.py): each (query chunk, key chunk) block becomes its documents'
  unmasked pieces (`block_pieces`); a block whose queries and keys share no document is skipped.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch._compile import _disable_dynamo

from model.attention.kernels import _attend_block, _dense, _grad_block

Tensor = torch.Tensor

SEGMENT_TOKENS = 512  # documents grouped into one masked SDPA call up to this many tokens


def is_document_ids(mask: Tensor | None) -> bool:
    """Whether megatron-core's attention_mask argument holds our document ids (integers)."""
    return mask is not None and not mask.dtype.is_floating_point and mask.dtype != torch.bool


def runs(ids: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each document of one sample's non-decreasing ids [s], in order."""
    change = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    bounds = [0, *change, ids.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def segments(ids: Tensor, limit: int = SEGMENT_TOKENS) -> list[tuple[int, int, bool]]:
    """(start, end, several documents?) of one sample: consecutive whole documents grouped while
    they fit in `limit` tokens; a longer document is a segment of its own."""
    out: list[tuple[int, int, bool]] = []
    start, end, count = 0, 0, 0
    for a, b in runs(ids):
        if count and b - start > limit:
            out.append((start, end, count > 1))
            start, count = a, 0
        end, count = b, count + 1
    out.append((start, end, count > 1))
    return out


def _segment_mask(ids: Tensor) -> Tensor:
    # [n] -> [n, n] bool, True where a query (row) may attend to a key: same document, not later
    n = ids.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
    return causal & (ids[:, None] == ids[None, :])


# Data-dependent calls per document: eager inside a compiled layer (train.compile). torch's own lazy
# form of torch.compiler.disable: TorchDynamo is imported at the first call, not when this module is
# (about 0.5 s of CPU in every rank of every run, documents or not).
@_disable_dynamo
def document_attention(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, scale: float, dropout: float = 0.0) -> Tensor:
    """Causal attention inside each document: q [b, np, s, hn], k [b, ng, s, hn], v [b, ng, s, hv]
    (np a multiple of ng; hv < hn for multi-latent attention), ids [b, s] -> [b, np, s, hv]. Without
    dropout each document is one causal call of the ring's verified block kernels
    (`DocumentAttentionFunction`); with dropout, SDPA calls over segments of documents (`segments`).
    flash-attn's kernel takes one head width only."""
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and v.size(-1) == q.size(-1)
    if flash and flash_attn_installed():
        return _flash_varlen(q, k, v, ids, scale, dropout)
    if dropout == 0.0:
        return DocumentAttentionFunction.apply(q, k, v, ids, scale)
    return _segment_sdpa(q, k, v, ids, scale, dropout)


class DocumentAttentionFunction(torch.autograd.Function):
    """Causal attention inside each document by one block-kernel call per document
    (model/attention/kernels.py through the ring's head handling), written into one output: the
    memory of one causal SDPA call (out and lse kept for the backward), no mask, and only the
    pairs inside documents computed."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, ids: Tensor, scale: float) -> Tensor:
        out = q.new_empty(*q.shape[:3], v.size(-1))  # [b, np, s, hv]: MLA's values are narrower
        lse = torch.empty(
            q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device
        )
        pieces = [(i, slice(a, b)) for i in range(q.size(0)) for a, b in runs(ids[i])]
        for i, rows in pieces:
            block_out, block_lse = _attend_block(q[i : i + 1], (k[i : i + 1], v[i : i + 1]), rows, rows, True, scale)
            out[i : i + 1, :, rows] = block_out
            lse[i : i + 1, :, rows] = block_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pieces, ctx.scale = pieces, scale
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dout = _dense(dout)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for i, rows in ctx.pieces:
            one = lambda t: t[i : i + 1]  # noqa: B023 (used at once)
            grads = _grad_block(one(dout), one(q), (one(k), one(v)), one(out), one(lse), rows, rows, True, ctx.scale)
            for grad, into in zip(grads, (dq, dk, dv)):
                into[i : i + 1, :, rows] = grad
        return dq, dk, dv, None, None


def _segment_sdpa(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, scale: float, dropout: float) -> Tensor:
    """SDPA calls (with dropout) over each sample's segments: one document causal, several with
    their block-diagonal causal mask."""
    gqa = q.size(1) != k.size(1)
    rows = []
    for i in range(q.size(0)):
        parts = []
        for a, b, several in segments(ids[i]):
            mask = _segment_mask(ids[i, a:b]) if several else None
            parts.append(
                F.scaled_dot_product_attention(
                    q[i : i + 1, :, a:b],
                    k[i : i + 1, :, a:b],
                    v[i : i + 1, :, a:b],
                    attn_mask=mask,
                    dropout_p=dropout,
                    is_causal=mask is None,
                    scale=scale,
                    enable_gqa=gqa,
                )
            )
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


@functools.cache
def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def cu_seqlens(ids: Tensor) -> tuple[Tensor, int]:
    """(cumulative document lengths [documents + 1] int32 over the flattened batch, longest document)."""
    lengths = [b - a for i in range(ids.size(0)) for a, b in runs(ids[i])]
    cumulative = torch.tensor([0, *lengths], dtype=torch.int32, device=ids.device).cumsum(0, dtype=torch.int32)
    return cumulative, max(lengths)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, scale: float, dropout: float) -> Tensor:
    # flash-attn's variable-length kernel (GPU only, not run in CI): the batch flattened to
    # [b·s, heads, hn], one causal attention per document
    from flash_attn import flash_attn_varlen_func

    b, heads, s, _ = q.shape
    cumulative, longest = cu_seqlens(ids)
    flat = [t.permute(0, 2, 1, 3).reshape(b * s, t.size(1), t.size(3)) for t in (q, k, v)]
    out = flash_attn_varlen_func(
        *flat, cumulative, cumulative, longest, longest, dropout_p=dropout, softmax_scale=scale, causal=True
    )
    return out.view(b, s, heads, v.size(3)).permute(0, 2, 1, 3)


def attended_pairs(ids: Tensor) -> int:
    """(query, key) pairs causal attention inside documents computes over ids [b, s]: Σ n(n+1)/2."""
    return sum((b - a) * (b - a + 1) // 2 for i in range(ids.size(0)) for a, b in runs(ids[i]))


# ------------------------------------------------------------------------------------------ ring


def ring_chunk_ids(ids: Tensor, rank: int, size: int) -> Tensor:
    """The document ids of ring rank `rank`'s rows in the load-balanced layout: chunks rank and
    2·size−1−rank of the 2·size chunks of ids [b, s] -> [b, s/size]."""
    b, s = ids.shape
    chunks = ids.view(b, 2 * size, s // (2 * size))
    return torch.cat([chunks[:, rank], chunks[:, 2 * size - 1 - rank]], dim=1)


def block_pieces(
    query_ids: Tensor, key_ids: Tensor, rows: slice, cols: slice, diagonal: bool
) -> list[tuple[int, slice, slice, bool]]:
    """The unmasked pieces (sample, query rows, key rows, causal) of one ring block, in the block's
    local coordinates: query rows `rows` of query_ids [b, n] against key rows `cols` of key_ids.

    `diagonal`: the same chunk on both sides (causal): one causal piece per document. Otherwise the
    keys all precede the queries, and only the document that spans from the keys' end to the
    queries' start is seen: one unmasked rectangle (its first queries × its last keys), or nothing.
    """
    pieces = []
    r0, c0 = rows.indices(query_ids.size(1))[0], cols.indices(key_ids.size(1))[0]
    for i in range(query_ids.size(0)):
        q, k = query_ids[i, rows], key_ids[i, cols]
        if diagonal:
            pieces += [(i, slice(r0 + a, r0 + b), slice(c0 + a, c0 + b), True) for a, b in runs(q)]
            continue
        last = k[-1]
        seen, seeing = int((q == last).sum()), int((k == last).sum())
        if seen:
            pieces.append((i, slice(r0, r0 + seen), slice(c0 + k.numel() - seeing, c0 + k.numel()), False))
    return pieces


# ------------------------------------------------------------------------------------ positions


def per_token_rotary(rope: Any, position_ids: Tensor) -> Tensor:
    """megatron-core's RotaryEmbedding.get_emb at each token's own position: position_ids [b, s]
    -> [s, b, 1, dim] (its [s, 1, 1, dim] for positions 0…s−1, the same products)."""
    seq = position_ids.t().to(rope.inv_freq.device, rope.inv_freq.dtype)  # [s, b]
    if rope.seq_len_interpolation_factor is not None:
        seq = seq * (1 / rope.seq_len_interpolation_factor)
    freqs = seq.unsqueeze(-1) * rope.inv_freq  # [s, b, dim/2]
    if rope.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.unsqueeze(2)


@functools.cache
def gpt_model_with_positions() -> type:
    """megatron-core's GPTModel whose RoPE reads position_ids (data.reset_position_ids): 0.16
    computes it from the position in the sample only (gpt_model.py, _preprocess). Multi-latent
    attention applies its own RoPE inside each layer (and takes no rotary embedding from the
    model): it is handed the position ids [b, s/cp] themselves in that argument
    (model/attention/mla.py:PositionedMLASelfAttention)."""
    from megatron.core.models.gpt import GPTModel

    class PositionedGPTModel(GPTModel):
        def _preprocess(self, input_ids: Tensor, position_ids: Tensor | None, *args: Any, **kwargs: Any) -> Any:
            out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
            if position_ids is None:
                return out
            if self.config.multi_latent_attention:  # (generation: MLA's positions from its KV cache)
                return out if kwargs.get("inference_context") is not None else (out[0], position_ids, *out[2:])
            if out[1] is None:  # no RoPE here (inference's precomputed cos/sin)
                return out
            return (out[0], per_token_rotary(self.rotary_pos_emb, position_ids), *out[2:])

    return PositionedGPTModel
