"""Ring attention for context parallelism: the K/V ring over block kernels (model/attention/kernels.py)
and the core_attention module that uses it.

Layout (megatron's load-balanced causal layout): the sequence is cut into 2·cp equal chunks and CP
rank r holds chunks r and 2·cp−1−r, in that order. Each rank keeps its queries; K/V blocks travel
around the ring and every rank merges the partial attention of each block with the online-softmax
rule. Scores exist only for one block at a time ([s/cp, s/cp]), never for the whole sequence.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from model.attention.documents import block_pieces, is_document_ids, ring_chunk_ids
from model.attention.kernels import (
    _attend_block,
    _dense,
    _grad_block,
    _stride_order,
    accumulation_dtype,
)
from model.attention.sdpa import SDPAttention

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------- the ring

_K_TAG, _V_TAG, _DK_TAG, _DV_TAG = 0, 1, 2, 3  # distinct tags: gloo matches messages by (peer, tag)


class _Ring(NamedTuple):
    group: dist.ProcessGroup
    rank: int  # rank inside the CP group
    size: int
    next: int  # global rank of (rank + 1) mod size
    prev: int  # global rank of (rank - 1) mod size

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> _Ring:
        ranks = dist.get_process_group_ranks(group)
        rank, size = dist.get_rank(group), len(ranks)
        return cls(group, rank, size, ranks[(rank + 1) % size], ranks[(rank - 1) % size])

    def shift(self, tensors: tuple[Tensor, ...], tags: tuple[int, ...]) -> _Transfer:
        """Posts send(each dense tensor → next) and recv(← prev), one message per tensor and tag."""
        incoming = tuple(torch.empty_like(t) for t in tensors)  # same strides as t (dense)
        sends = [
            lambda t=t, tag=tag: dist.isend(_message(t), self.next, group=self.group, tag=tag)
            for t, tag in zip(tensors, tags)
        ]
        recvs = [
            lambda t=t, tag=tag: dist.irecv(_message(t), self.prev, group=self.group, tag=tag)
            for t, tag in zip(incoming, tags)
        ]
        # Even ranks send first, odd ranks receive first: cannot deadlock even where p2p blocks.
        works = [post() for post in (sends + recvs if self.rank % 2 == 0 else recvs + sends)]
        return _Transfer(works, incoming, tensors)


class _Transfer(NamedTuple):
    works: list
    incoming: tuple[Tensor, ...]  # what the recvs fill, laid out like the tensors sent
    # The tensors sent stay referenced until _arrive, as a send may read them until then; so every
    # backend holds the same memory, also the no-op one the benchmark simulates a ring with.
    sent: tuple[Tensor, ...]


def _message(t: Tensor) -> Tensor:
    # a dense t's elements as one contiguous tensor, what isend/irecv need
    return t.permute(_stride_order(t))


def _arrive(pending: _Transfer) -> tuple[Tensor, Tensor]:
    """The pair of tensors a shift of two (K and V, or dK and dV) brought in, once received."""
    for work in pending.works:
        work.wait()
    first, second = pending.incoming
    return first, second


def _step_blocks(step: int, rank: int, size: int, half: int) -> tuple[tuple[slice, slice, bool], ...]:
    """The (query rows, key rows, causal) pieces computed at ring `step`, against the K/V of CP rank
    (rank − step) mod size: the causal diagonal at step 0 (its results start the accumulators),
    after that the two quarter-blocks [one chunk of ours × one chunk of its] not fully masked, one
    kernel call each, so that no piece's gradients exceed half our rows or half its keys.

    Fully masked quarter-blocks are never computed: an earlier rank's second chunk is in the
    future of all our queries; a later rank's both chunks are in the future of our first chunk.
    """
    source = (rank - step) % size
    if step == 0:
        return ((slice(None), slice(None), True),)
    first, second = slice(0, half), slice(half, None)
    if source < rank:  # both our chunks see its first chunk
        return (first, first, False), (second, first, False)
    return (second, first, False), (second, second, False)  # our second chunk sees both of its


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Online softmax in the accumulation dtype, in place: out/lse ([b, np, rows, hn] / [b, np, rows])
    absorb one block (whose out, a fresh kernel result, is scaled in place: no block-sized temporary)."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out.to(out.dtype).mul_(torch.exp(block_lse - new_lse).unsqueeze(-1)))
    lse.copy_(new_lse)


def _empty_in_layout(shape: torch.Size, like: Tensor) -> Tensor:
    """An empty dense tensor of `shape` in the accumulation dtype, its dims in memory in like's order
    (the output takes q's layout; its last dim, the values' width, may differ from q's)."""
    order = _stride_order(like)
    empty = torch.empty([shape[d] for d in order], dtype=accumulation_dtype(like), device=like.device)
    return empty.permute([order.index(d) for d in range(len(order))])


def _accumulator_like(t: Tensor, like: Tensor) -> Tensor:
    """t in the accumulation dtype with like's layout (t itself when it already is; a size-1 dim's
    stride is moot)."""
    if t.dtype == accumulation_dtype(like) and t.permute(_stride_order(like)).is_contiguous():
        return t
    return _empty_in_layout(t.shape, like).copy_(t)


def _ring_forward(q: Tensor, kv: tuple[Tensor, Tensor], ring: _Ring, scale: float) -> tuple[Tensor, Tensor]:
    """q [b, np, s/cp, hn], kv = (k [b, ng, s/cp, hn], v [b, ng, s/cp, hv]) -> out [b, np, s/cp, hv],
    lse [b, np, s/cp], both in the accumulation dtype."""
    half = q.size(2) // 2
    out: Tensor | None = None
    lse: Tensor | None = None
    for step in range(ring.size):
        # send next: the block we hold moves on while we compute with it
        pending = ring.shift(kv, (_K_TAG, _V_TAG)) if step < ring.size - 1 else None
        # compute current, merge (step 0 is the causal diagonal: every query row sees at least itself)
        for rows, cols, causal in _step_blocks(step, ring.rank, ring.size, half):
            block_out, block_lse = _attend_block(q, kv, rows, cols, causal, scale)
            if out is None or lse is None:
                out, lse = _accumulator_like(block_out, q), block_lse
            else:
                _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            del block_out, block_lse  # freed before the next kernel allocates its own
        if pending is not None:
            kv = _arrive(pending)
    assert out is not None and lse is not None  # ring.size >= 1: step 0 always runs
    return out, lse


def _document_pieces(step: int, ring: _Ring, half: int, documents: Tensor) -> list[tuple[int, slice, slice, bool]]:
    """The unmasked pieces (sample, rows, key rows, causal) of ring `step` under document ids
    [b, s_ring] (the ring's whole sequence): each of the step's blocks cut to its documents
    (model/attention/documents.py:block_pieces); blocks with no document on both sides give none (skipped).
    Step 0's diagonal block is cut in three: each chunk's own documents and our second chunk's
    view of our first."""
    source = (ring.rank - step) % ring.size
    query_ids = ring_chunk_ids(documents, ring.rank, ring.size)
    key_ids = query_ids if step == 0 else ring_chunk_ids(documents, source, ring.size)
    first, second = slice(0, half), slice(half, 2 * half)
    blocks = (
        [(first, first, True), (second, first, False), (second, second, True)]
        if step == 0
        else [(rows, cols, False) for rows, cols, _ in _step_blocks(step, ring.rank, ring.size, half)]
    )
    return [
        piece for rows, cols, diagonal in blocks for piece in block_pieces(query_ids, key_ids, rows, cols, diagonal)
    ]


def _one(t: Tensor, i: int) -> Tensor:
    return t[i : i + 1]  # sample i, as a batch of one (a view)


def _document_ring_forward(
    q: Tensor, kv: tuple[Tensor, Tensor], ring: _Ring, scale: float, documents: Tensor
) -> tuple[Tensor, Tensor]:
    """_ring_forward inside documents: the same K/V ring, each step's blocks cut to their documents'
    pieces. Accumulators start empty (out 0, lse −inf): every row gets its own diagonal later."""
    half = q.size(2) // 2
    out = _empty_in_layout(q.shape[:3] + kv[1].shape[3:], q).zero_()  # [b, np, s/cp, hv]
    lse = torch.full(q.shape[:3], float("-inf"), dtype=accumulation_dtype(q), device=q.device)
    for step in range(ring.size):
        pending = ring.shift(kv, (_K_TAG, _V_TAG)) if step < ring.size - 1 else None
        for i, rows, cols, causal in _document_pieces(step, ring, half, documents):
            sample_kv = (_one(kv[0], i), _one(kv[1], i))
            block_out, block_lse = _attend_block(_one(q, i), sample_kv, rows, cols, causal, scale)
            _merge(_one(out, i)[:, :, rows], _one(lse, i)[:, :, rows], block_out, block_lse)
            del block_out, block_lse
        if pending is not None:
            kv = _arrive(pending)
    return out, lse


def _document_ring_backward(
    dout: Tensor,
    q: Tensor,
    kv: tuple[Tensor, Tensor],
    out: Tensor,
    lse: Tensor,
    ring: _Ring,
    scale: float,
    documents: Tensor,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """_ring_backward inside documents: the same two rings, each step's pieces only."""
    half = q.size(2) // 2
    dq = torch.zeros_like(q, dtype=accumulation_dtype(q))
    dkv_pending: _Transfer | None = None
    for step in range(ring.size):
        kv_pending = ring.shift(kv, (_K_TAG, _V_TAG)) if step < ring.size - 1 else None
        if step == 0:
            dk, dv = (torch.zeros_like(t, dtype=accumulation_dtype(t)) for t in kv)
        else:
            assert dkv_pending is not None
            dk, dv = _arrive(dkv_pending)  # the accumulators that previous ranks built for this block
        for i, rows, cols, causal in _document_pieces(step, ring, half, documents):
            sample_kv = (_one(kv[0], i), _one(kv[1], i))
            grads = _grad_block(
                _one(dout, i), _one(q, i), sample_kv, _one(out, i), _one(lse, i), rows, cols, causal, scale
            )
            _one(dq, i)[:, :, rows] += grads[0]
            _one(dk, i)[:, :, cols] += grads[1]
            _one(dv, i)[:, :, cols] += grads[2]
            del grads
        if ring.size > 1:
            dkv_pending = ring.shift((dk, dv), (_DK_TAG, _DV_TAG))
        if kv_pending is not None:
            kv = _arrive(kv_pending)
    return dq, (_arrive(dkv_pending) if dkv_pending is not None else (dk, dv))


def _ring_backward(
    dout: Tensor, q: Tensor, kv: tuple[Tensor, Tensor], out: Tensor, lse: Tensor, ring: _Ring, scale: float
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """-> dq [b, np, s/cp, hn], (dk [b, ng, s/cp, hn], dv [b, ng, s/cp, hv]) for this rank's own K/V, in
    the accumulation dtype.

    A block's dK/dV accumulator follows its K/V one step behind: rank r adds its share of block j
    and passes it on; after cp hops it is back at rank j, complete.
    """
    half = q.size(2) // 2
    dq: Tensor | None = None
    dkv_pending: _Transfer | None = None
    for step in range(ring.size):
        # send next: K/V for the following step
        kv_pending = ring.shift(kv, (_K_TAG, _V_TAG)) if step < ring.size - 1 else None
        # compute current: this block's share of dq (local) and of dk/dv (travelling)
        dk: Tensor | None = None
        dv: Tensor | None = None
        for rows, cols, causal in _step_blocks(step, ring.rank, ring.size, half):
            dq_block, dk_block, dv_block = _grad_block(dout, q, kv, out, lse, rows, cols, causal, scale)
            if dq is None:  # step 0, the causal diagonal: every query row, our own block's keys
                dq = _accumulator_like(dq_block, q)
                dk, dv = _accumulator_like(dk_block, kv[0]), _accumulator_like(dv_block, kv[1])
            else:
                if dk is None or dv is None:  # the accumulators that previous ranks built for this block
                    assert dkv_pending is not None
                    dk, dv = _arrive(dkv_pending)
                dq[:, :, rows] += dq_block
                dk[:, :, cols] += dk_block
                dv[:, :, cols] += dv_block
            del dq_block, dk_block, dv_block  # freed before the next kernel allocates its own
        # pass the accumulators on
        assert dk is not None and dv is not None
        if ring.size > 1:
            dkv_pending = ring.shift((dk, dv), (_DK_TAG, _DV_TAG))
        if kv_pending is not None:
            kv = _arrive(kv_pending)
    assert dq is not None and dk is not None and dv is not None
    return dq, (_arrive(dkv_pending) if dkv_pending is not None else (dk, dv))


def _check_heads(heads: int, groups: int) -> None:
    if groups <= 0 or heads % groups != 0:
        raise ValueError(f"ring attention needs num_attention_heads ({heads}) divisible by num_query_groups ({groups})")


class RingAttentionFunction(torch.autograd.Function):
    """Causal attention over a context-parallel group, on megatron's load-balanced layout.

    q/k [b, np|ng, s/cp, hn], v [b, ng, s/cp, hv] (np a multiple of ng; hv may differ from hn, as in
    multi-latent attention, whose softmax scale comes from hn) -> out [b, np, s/cp, hv].
    Forward communication: each rank's K and V (ng heads, two messages) travel once around
    `group` (cp−1 isend/irecv hops, each overlapped with one block of compute).
    Backward communication: the K/V travel around again (cp−1 hops) and their dK/dV accumulators
    (fp32; fp64 for fp64 inputs) follow one step behind (cp hops), ending at the rank that owns
    the K/V.
    Dense inputs in any dim order (a model's [s, b, h, d] seen as [b, h, s, d]) are used as they
    are, and the output and gradients come back in the same layout.
    cp == 1 communicates nothing.
    `documents` (optional): document ids [b, s_ring] of the ring's whole sequence in true order
    (the same on every rank): attention stays inside each document, and blocks whose queries and
    keys share none are not computed; the communication is the same.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        group: dist.ProcessGroup,
        scale: float,
        documents: Tensor | None = None,
    ) -> Tensor:
        _check_heads(q.size(1), k.size(1))
        if q.size(2) % 2:
            raise ValueError(f"ring attention needs an even local sequence (two chunks), got {q.size(2)}")
        ring = _Ring.of(group)
        if documents is not None and documents.shape != (q.size(0), q.size(2) * ring.size):
            raise ValueError(
                f"ring attention needs document ids [b, s_ring] = [{q.size(0)}, {q.size(2) * ring.size}], "
                f"got {list(documents.shape)}"
            )
        if documents is None:
            out, lse = _ring_forward(_dense(q), (_dense(k), _dense(v)), ring, scale)
        else:
            out, lse = _document_ring_forward(_dense(q), (_dense(k), _dense(v)), ring, scale, documents)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale, ctx.documents = ring, scale, documents
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        kv = (_dense(k), _dense(v))
        if ctx.documents is None:
            dq, (dk, dv) = _ring_backward(_dense(dout), _dense(q), kv, out, lse, ctx.ring, ctx.scale)
        else:
            dq, (dk, dv) = _document_ring_backward(
                _dense(dout), _dense(q), kv, out, lse, ctx.ring, ctx.scale, ctx.documents
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ------------------------------------------------------------------------------- core attention


class ContextParallelAttention(SDPAttention):
    """What the context-parallel core attentions share (the ring here, Ulysses in model/attention/ulysses.py):
    megatron-core's constructor and the CP group. megatron-core's local DotProductAttention refuses
    context parallelism (TE's needs a GPU)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
    ):
        """megatron-core's core-attention arguments; `k_channels`/`v_channels`: multi-latent
        attention's query/key and value head widths (SDPAttention's)."""
        _check_heads(config.num_attention_heads, config.num_query_groups or config.num_attention_heads)
        # The parent asserts context_parallel_size == 1 (only TE may do CP); it reads nothing
        # else from it, so it is built from a shallow copy and then given the real config.
        parent_config = copy.copy(config)
        parent_config.context_parallel_size = 1
        super().__init__(
            parent_config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            k_channels=k_channels,
            v_channels=v_channels,
        )
        self.config = config
        cp_group = getattr(pg_collection, "cp", None)  # megatron's Attention passes its whole collection
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: object = None,
    ) -> Tensor:
        """megatron-core's core-attention call, for training only (context parallelism has no
        generation step): causal, no bias, packed sequences or dropout; the only mask tensor is our
        document ids [b, s] of the whole sequence (model/attention/documents.py)."""
        if not self._check_call(query.size(0), attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            raise NotImplementedError(
                f"{type(self).__name__} has no generation step (context parallelism is for training)"
            )
        if self.training and self.attention_dropout.p > 0.0:
            raise NotImplementedError(
                f"{type(self).__name__} has no attention dropout, got {self.attention_dropout.p}; "
                "set attention_dropout to 0"
            )
        return self.attend(query, key, value, attention_mask if is_document_ids(attention_mask) else None)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, documents: Tensor | None) -> Tensor:
        """[s/cp, b, np, hn] queries, [s/cp, b, ng, hn] keys, [s/cp, b, ng, hv] values, load-balanced ->
        [s/cp, b, np·hv];
        `documents`: None, or the document ids [b, s] of the whole sequence (in true order)."""
        raise NotImplementedError


class RingAttention(ContextParallelAttention):
    """Causal core attention over the context-parallel group by the K/V ring.

    Takes query [s/cp, b, np, hn], key [s/cp, b, ng, hn] and value [s/cp, b, ng, hv] in the
    load-balanced layout and returns [s/cp, b, np·hv]; inside documents when given their ids. No
    dropout, bias or packed sequences.
    """

    def attend(self, query: Tensor, key: Tensor, value: Tensor, documents: Tensor | None) -> Tensor:
        # [s/cp, b, np, hn] -> [b, np, s/cp, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = RingAttentionFunction.apply(q, k, v, self.cp_group, self.softmax_scale, documents)
        return self._to_hidden(context)  # [s/cp, b, np * hv]
