"""Attention inside documents under context parallelism (model/attention/documents.py through
model/attention/ring.py and model/attention/ulysses.py): the ring at CP 2 and 4, Ulysses a2a at 2 and 4 and
a2a 2 × p2p 2 on 4 gloo processes, against each document attended alone on the whole sequence."""

import pytest
import torch
import torch.distributed as dist

from model.attention.documents import attended_pairs
from model.attention.kernels import CANDIDATES, _backend_for
from model.attention.ring import RingAttentionFunction, _document_pieces, _Ring
from model.attention.ulysses import ulysses_attention
from tests.distributed.test_ulysses import load_balanced_slice
from tests.helpers.spawn import run_distributed
from tests.unit.test_documents import per_document_reference, sample_ids

TOL = dict(rtol=1e-5, atol=1e-5)
SCALE = 0.3
B, HEADS, GROUPS, HEAD_DIM, SEQ = 2, 4, 2, 8, 64
# many short documents; one long document across chunks of both CP sizes beside two short ones
LENGTHS = [[3, 1, 7, 5, 2, 9, 4, 6, 11, 16], [40, 2, 22]]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _problem():
    """q [s, b, np, hn], k and v [s, b, ng, hn], dout, document ids [b, s]; and the reference out,
    dq, dk, dv in [s, b, h, d]."""
    ids = sample_ids(LENGTHS)
    q, k, v, dout = (_randn(SEQ, B, h, HEAD_DIM, seed=s) for s, h in ((0, HEADS), (1, GROUPS), (2, GROUPS), (3, HEADS)))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = per_document_reference(*(t.permute(1, 2, 0, 3) for t in leaves), ids).permute(2, 0, 1, 3)
    grads = torch.autograd.grad(out, leaves, dout)
    return (q, k, v, dout, ids), (out.detach(), *grads)


def _results(kind: str, group, ring_group, cp: int, cp_rank: int, documents: bool = True) -> list:
    (q, k, v, dout, ids), _ = _problem()
    ids = ids if documents else None
    shard = lambda t: load_balanced_slice(t, cp_rank, cp, dim=0)
    leaves = [shard(t).requires_grad_() for t in (q, k, v)]
    if kind == "ring":
        out = RingAttentionFunction.apply(*(t.permute(1, 2, 0, 3) for t in leaves), group, SCALE, ids)
        out = out.permute(2, 0, 1, 3)
    else:
        out = ulysses_attention(*leaves, group, ring_group, SCALE, ids)
    out.backward(shard(dout))
    return [out.detach().contiguous()] + [t.grad for t in leaves]


def _on_every_rank(rank: int, world: int) -> dict:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    rings = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair, ring = pairs[rank // 2], rings[rank % 2]
    results = {
        "ring4": _results("ring", dist.group.WORLD, None, 4, rank),
        "ring2": _results("ring", pair, None, 2, rank % 2),
        "a2a4": _results("a2a", dist.group.WORLD, None, 4, rank),
        "a2a2": _results("a2a", pair, None, 2, rank % 2),
        "a2a2xp2p2": _results("a2a", pair, ring, 4, rank),
        "control-no-documents": _results("ring", dist.group.WORLD, None, 4, rank, documents=False),
    }
    # plain math kernels: K/V heads folded (unmasked pieces) or copied (causal ones)
    CANDIDATES["cpu"], saved = (), CANDIDATES["cpu"]
    _backend_for.cache_clear()
    try:
        results["ring4-math"] = _results("ring", dist.group.WORLD, None, 4, rank)
    finally:
        CANDIDATES["cpu"] = saved
        _backend_for.cache_clear()
    return results


@pytest.mark.slow
def test_context_parallel_attention_stays_inside_documents():
    """Every rank's slices of out, dq, dk, dv equal the same slices of each document attended alone.
    The control, the ring without the ids (causal over the packed sample), is far off."""
    per_rank = run_distributed(_on_every_rank, 4)
    _, expected = _problem()
    for rank, results in enumerate(per_rank):
        control = results.pop("control-no-documents")
        assert (control[0] - load_balanced_slice(expected[0], rank, 4, dim=0)).abs().max() > 0.1
        for case, got in results.items():
            cp, cp_rank = (2, rank % 2) if case in ("ring2", "a2a2") else (4, rank)
            for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
                torch.testing.assert_close(
                    a,
                    load_balanced_slice(e, cp_rank, cp, dim=0),
                    **TOL,
                    msg=lambda m, where=f"rank {rank} {case} {name}": f"{where}: {m}",
                )


def test_ring_computes_only_the_attended_pairs_and_skips_blocks():
    """The pieces every rank of a CP 4 ring computes cover each attended (query, key) pair once and
    nothing else; a block whose queries and keys share no document is never computed."""
    ids = sample_ids(LENGTHS)
    half = SEQ // 8
    pairs, skipped, blocks = 0, 0, 0
    for rank in range(4):
        for step in range(4):
            ring = _Ring(None, rank, 4, 0, 0)  # type: ignore[arg-type]
            pieces = _document_pieces(step, ring, half, ids)
            pairs += sum(
                (r.stop - r.start) * ((c.stop - c.start + 1) / 2 if causal else (c.stop - c.start))
                for _, r, c, causal in pieces
            )
            blocks += (3 if step == 0 else 2) * B
            skipped += (3 if step == 0 else 2) * B - len(
                {(i, r.start // half, c.start // half) for i, r, c, _ in pieces}
            )
    assert pairs == attended_pairs(ids)
    assert 0 < skipped < blocks, (skipped, blocks)
