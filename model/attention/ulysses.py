"""Ulysses context parallelism: all-to-all between sequence and head shards around causal attention.

parallel.context_comm a2a runs one SDPA call over the whole sequence for each rank's share of the
heads; a2a+p2p runs the ring (model/attention/ring.py) across the all-to-all groups instead.

Layout: the rest of the model keeps megatron's load-balanced causal layout (2·cp chunks, CP rank r
holds chunks r and 2·cp−1−r). The n consecutive CP ranks g·n … g·n+n−1 of an all-to-all group hold
chunks g·n … g·n+n−1 and their mirrors 2·cp−g·n−n … 2·cp−1−g·n. After the all-to-all each rank has
those 2n chunks in true order for 1/n of the heads: for a2a (one group of cp) the whole sequence;
for a2a+p2p exactly the ring's load-balanced layout one level up (2·cp/n super-chunks of n chunks,
ring rank g holding super-chunks g and 2·cp/n−1−g), so the ring runs on it unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from model.attention.documents import document_attention
from model.attention.ring import ContextParallelAttention, RingAttentionFunction

Tensor = torch.Tensor

# ------------------------------------------------------------------------------- the all-to-alls


@functools.cache
def _received_order(n: int, device: torch.device) -> Tensor:
    """Which received chunk is the i-th of the group's 2n in true order. Received chunks come as
    [source rank u, its first or second chunk]: u's first is the group's chunk u, its second the
    group's chunk 2n−1−u (the mirrors run backwards)."""
    firsts = [2 * u for u in range(n)]
    seconds = [2 * (2 * n - 1 - i) + 1 for i in range(n, 2 * n)]
    return torch.tensor(firsts + seconds, device=device)


@functools.cache
def _sent_order(n: int, device: torch.device) -> Tensor:
    """Which of the group's 2n chunks (true order) goes to [destination rank u, its first or second
    chunk]: chunks u and 2n−1−u, the inverse of _received_order."""
    return torch.tensor([c for u in range(n) for c in (u, 2 * n - 1 - u)], device=device)


def _sequence_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    # [2c, b, h, d] (this rank's two chunks) -> [2n·c, b, h/n, d] (the group's chunks, true order)
    n = dist.get_world_size(group)
    rows, b, h, d = x.shape
    c = rows // 2
    # [2, c, b, n, h/n, d] -> [n, 2, c, b, h/n, d]: destination rank first (a dim split is always a view)
    send = x.view(2, c, b, n, h // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    received = torch.empty_like(send)  # [n, 2, c, b, h/n, d]: source rank first
    dist.all_to_all_single(received, send, group=group)
    del send
    chunks = received.view(2 * n, c, b, h // n, d).index_select(0, _received_order(n, x.device))
    return chunks.view(2 * n * c, b, h // n, d)


def _heads_to_sequence(y: Tensor, group: dist.ProcessGroup) -> Tensor:
    # [2n·c, b, h/n, d] (the group's chunks, true order) -> [2c, b, h, d] (this rank's two chunks)
    n = dist.get_world_size(group)
    rows, b, share, d = y.shape
    c = rows // (2 * n)
    # [2n, c, b, h/n, d] -> [n·2, c, b, h/n, d]: destination rank first, its two chunks in its order
    send = y.reshape(2 * n, c, b, share, d).index_select(0, _sent_order(n, y.device))
    received = torch.empty_like(send)  # [n·2, c, b, h/n, d]: source rank (= head share) first
    dist.all_to_all_single(received, send, group=group)
    del send
    # [n, 2, c, b, h/n, d] -> [2, c, b, n, h/n, d] -> [2c, b, h, d], contiguous: the layer views it as [2c, b, h·d]
    return received.view(n, 2, c, b, share, d).permute(1, 2, 3, 0, 4, 5).contiguous().view(2 * c, b, n * share, d)


class SequenceToHeads(torch.autograd.Function):
    """[2c, b, h, d], this rank's two chunks of the load-balanced layout, for all h heads ->
    [2n·c, b, h/n, d], the 2n chunks of the n ranks of `group` in true order, for head share u
    (heads u·h/n … (u+1)·h/n−1) on group rank u.

    Forward: one all_to_all_single over `group` (to each rank, that rank's heads of our two chunks),
    then one copy that puts the chunks in true order. Backward: the mirror, HeadsToSequence's forward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _heads_to_sequence(grad, ctx.group), None


class HeadsToSequence(torch.autograd.Function):
    """The inverse of SequenceToHeads: [2n·c, b, h/n, d], the group's chunks in true order for this
    rank's head share -> [2c, b, h, d], this rank's two chunks of the load-balanced layout, all heads.

    Forward: one copy that orders the chunks by destination, then one all_to_all_single over `group`.
    Backward: the mirror, SequenceToHeads's forward.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _heads_to_sequence(y, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _sequence_to_heads(grad, ctx.group), None


# ------------------------------------------------------------------------------------ attention


def check_heads(heads: int, groups: int, a2a: int) -> None:
    """Each of the a2a ranks gets heads/a2a query heads; K/V heads are split (groups a multiple of
    a2a) or copied (a2a a multiple of groups: a rank's query heads then share one K/V head)."""
    if heads % a2a:
        raise ValueError(f"Ulysses attention needs the query heads ({heads}) divisible by the all-to-all size ({a2a})")
    if groups % a2a and a2a % groups:
        raise ValueError(
            f"Ulysses attention needs the K/V heads ({groups}) and the all-to-all size ({a2a}) to divide one another"
        )
    if heads % groups:
        raise ValueError(f"Ulysses attention needs the query heads ({heads}) divisible by the K/V heads ({groups})")


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a2a_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup | None,
    scale: float,
    documents: Tensor | None = None,
) -> Tensor:
    """Causal attention of q [s/cp, b, np, hn] on k [s/cp, b, ng, hn] and v [s/cp, b, ng, hv] (hv may
    differ from hn: multi-latent attention), all three this rank's two chunks of the load-balanced
    layout -> [s/cp, b, np, hv], the same rows.

    Over `a2a_group` q, k and v trade sequence shards for head shards, one SDPA call (ring_group
    None) or the ring over `ring_group` attends over the group's sequence, and the output trades
    back. Fewer K/V heads than a2a ranks are copied first, so each rank gets the one its query
    heads share (their gradients are summed back by autograd). `documents` [b, s] (the whole
    sequence's document ids): attention inside documents, after the all-to-all the local kernel
    (model/attention/documents.py) or the ring's, both on the sequence in true order.
    """
    n = dist.get_world_size(a2a_group)
    check_heads(q.size(2), k.size(2), n)
    if k.size(2) < n:
        # [2c, b, ng, hn] -> [2c, b, n, hn]: K/V head j serves query heads j·np/ng …, which land on
        # ranks j·n/ng … (j+1)·n/ng−1
        k, v = (t.repeat_interleave(n // k.size(2), dim=2) for t in (k, v))
    q, k, v = (SequenceToHeads.apply(t, a2a_group) for t in (q, k, v))  # [s_g, b, heads/n, hn]
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads/n, s_g, hn] views
    if ring_group is not None:
        context = RingAttentionFunction.apply(qb, kb, vb, ring_group, scale, documents)
    elif documents is not None:
        context = document_attention(qb, kb, vb, documents, scale)
    else:
        context = F.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, scale=scale, enable_gqa=qb.size(1) != kb.size(1)
        )
    return HeadsToSequence.apply(context.permute(2, 0, 1, 3), a2a_group)  # [s/cp, b, np, hv]


class UlyssesAttention(ContextParallelAttention):
    """Causal core attention over the context-parallel group by all-to-all (cp_comm_type a2a), or by
    all-to-all inside megatron-core's hierarchical CP groups and the ring across them (a2a+p2p).

    Takes query [s/cp, b, np, hn], key [s/cp, b, ng, hn] and value [s/cp, b, ng, hv] in the
    load-balanced layout and returns [s/cp, b, np·hv]; inside documents when given their ids. No
    dropout, bias or packed sequences.
    """

    def __init__(self, config: TransformerConfig, *args: Any, **kwargs: Any):
        """megatron-core's core-attention arguments (ContextParallelAttention's)."""
        super().__init__(config, *args, **kwargs)
        cp_comm_type, pg_collection = kwargs.get("cp_comm_type"), kwargs.get("pg_collection")
        comm = cp_comm_type or config.cp_comm_type
        self.ring_group: dist.ProcessGroup | None = None
        self.a2a_group = self.cp_group
        if comm == "a2a+p2p":
            self.a2a_group, self.ring_group = _hierarchical_groups(pg_collection)
        elif comm != "a2a":
            raise ValueError(f"UlyssesAttention needs cp_comm_type a2a or a2a+p2p, got {comm}")
        check_heads(
            self.num_attention_heads_per_partition,
            self.num_query_groups_per_partition,
            dist.get_world_size(self.a2a_group),
        )

    def attend(self, query: Tensor, key: Tensor, value: Tensor, documents: Tensor | None) -> Tensor:
        context = ulysses_attention(query, key, value, self.a2a_group, self.ring_group, self.softmax_scale, documents)
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)  # [s/cp, b, np·hv]


def _hierarchical_groups(pg_collection: ProcessGroupCollection | None) -> tuple[Any, Any]:
    """(all-to-all group, ring group): megatron-core's hierarchical CP groups, built for every CP
    group on every rank by initialize_model_parallel(hierarchical_context_parallel_sizes=[a2a, ring])."""
    groups = getattr(pg_collection, "hcp", None) or parallel_state.get_hierarchical_context_parallel_groups(
        check_initialized=False
    )
    if not groups or len(groups) != 2:
        raise ValueError(
            "cp_comm_type a2a+p2p needs megatron-core's two hierarchical context-parallel groups: "
            "initialize_model_parallel(hierarchical_context_parallel_sizes=[a2a, ring])"
        )
    return groups[0], groups[1]
