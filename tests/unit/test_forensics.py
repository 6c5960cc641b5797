"""The collective ring (pretrain/forensics.py) on one gloo process, and the hang summary from answers
written by hand: who waits in what, who never entered it, where that rank is."""

import pytest
import torch
import torch.distributed as dist

from pretrain.forensics import CollectiveRing, summarize


@pytest.fixture
def world():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _caller(tensor):
    dist.all_reduce(tensor)  # the site the ring must name


def test_ring_records_op_group_shape_dtype_and_calling_site(world):
    ring = CollectiveRing(rank=0)
    with ring.installed():
        ring.step, ring.phase = 4, "optimizer"
        _caller(torch.ones(3, 2))
        objects = [None]
        dist.all_gather_object(objects, {"a": 1})  # gathers through all_gather inside: counted once
        p2p = dist.P2POp(dist.isend, torch.ones(1), 0)  # P2POp accepts the wrapped isend
        assert p2p.op is dist.distributed_c10d.isend
    assert dist.all_reduce.__module__ == "torch.distributed.distributed_c10d"  # unwrapped after
    first, second = ring.entries
    world_key = first.group
    assert ring.counts == {world_key: 2} and ring.groups[world_key] == {"label": "world", "ranks": [0]}
    assert (first.seq, first.op, first.shape, first.dtype, first.step, first.phase, first.done) == (
        1,
        "all_reduce",
        (3, 2),
        "float32",
        4,
        "optimizer",
        True,
    )
    assert first.site[0].endswith("tests/unit/test_forensics.py") and first.site[2] == "_caller"
    assert (second.seq, second.op) == (2, "all_gather_object")


def _answer(rank, counts, entries, at="pretrain/step.py:10 in train", recent=0):
    return {
        "rank": rank,
        "step": 3,
        "phase": "forward_backward",
        "elapsed": 9.0,
        "recent": recent,
        "since": 1.0,
        "at": at,
        "counts": counts,
        "groups": {"1": {"label": "tensor model parallel group", "ranks": [0, 1]}},
        "entries": entries,
    }


def _entry(seq, group="1", op="all_reduce", done=False):
    site = ["/x/site-packages/megatron/core/tensor_parallel/mappings.py", 31, "_reduce"]
    return {
        "seq": seq,
        "op": op,
        "group": group,
        "shape": [2, 4],
        "dtype": "bfloat16",
        "site": site,
        "step": 3,
        "phase": "forward_backward",
        "asynchronous": False,
        "done": done,
    }


def test_summary_names_the_rank_that_never_entered_and_where_it_is():
    answers = {
        0: _answer(0, {"1": 5}, [_entry(5)]),
        1: _answer(1, {"1": 4}, [_entry(4, done=True)], at="data/loader.py:80 in step"),
    }
    assert summarize(answers, 2).splitlines() == [
        "watchdog: hang report: rank 1 never entered all_reduce #5 on tensor model parallel group [0, 1], which "
        "rank 0 waits in; rank 1 is at data/loader.py:80 in step (step 3 forward_backward)",
        "  rank 0 (step 3 forward_backward, 9.0 s): waits in all_reduce #5 on tensor model parallel group [0, 1] "
        "(bfloat16 [2, 4]) at megatron/core/tensor_parallel/mappings.py:31 in _reduce; never entered it: rank 1",
        "  rank 1 (step 3 forward_backward, 9.0 s): in no collective, at data/loader.py:80 in step",
    ]


def test_summary_of_point_to_point():
    """Pipeline stages: rank 1 waits to send its activations to rank 3, which never posted the receive."""
    send = _entry(3, group="p2p 1->3", op="isend")
    answers = {
        1: _answer(1, {"p2p 1->3": 3}, [send]),
        3: _answer(3, {"p2p 1->3": 2}, [], at="pretrain/faults.py:51 in f"),
    }
    assert summarize(answers, 4).splitlines()[0] == (
        "watchdog: hang report: rank 3 never entered the receive matching isend #3 on point-to-point ranks 1->3, "
        "which rank 1 waits in; rank 3 is at pretrain/faults.py:51 in f (step 3 forward_backward)"
    )


def test_summary_of_point_to_point_and_of_a_silent_or_progressing_rank():
    recv = _entry(2, group="p2p 0->1", op="irecv")
    answers = {1: _answer(1, {"p2p 0->1": 2}, [recv]), 2: _answer(2, {}, [], recent=7)}
    lines = summarize(answers, 3).splitlines()
    assert lines[0] == (
        "watchdog: hang report: no rank is missing from a collective; rank 2 still enters collectives (slow, not hung)"
    )
    assert lines[1].endswith(
        "waits in irecv #2 on point-to-point ranks 0->1 (bfloat16 [2, 4]) at "
        "megatron/core/tensor_parallel/mappings.py:31 in _reduce; no answer from rank 0"
    )
    assert lines[2] == "  rank 2 (step 3 forward_backward, 9.0 s): progressing, entered 7 collectives in the last 1.0 s"
    assert lines[3] == "  no answer from rank 0"
