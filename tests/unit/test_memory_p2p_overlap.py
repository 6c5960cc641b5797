"""What megatron-core's interleaved schedule holds beyond the blocking one with overlap_p2p_comm
(planning/schedule.py:overlap_held), against the CPU allocator's peaks (docs/benchmarks.md, "Memory
model: predicted vs measured peak per rank"; the pinned `dense bf16 pp2 vpp2 overlap_p2p` row of
tests/unit/test_memory.py checks the whole estimate)."""

import pytest

from planning.memory import Target, estimate
from planning.schedule import in_flight, overlap_held
from pretrain.recipe import load_recipe

CPU = Target.for_device("cpu", "local")
# pipeline 4 × virtual 2, fp32, [s·b, h] = 512 × 256 × 4 bytes = 0.5 MiB per pipeline tensor
PP4_VPP2 = [
    "model.num_layers=8",
    "model.hidden_size=256",
    "model.ffn_hidden_size=704",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=512",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "parallel.pipeline=4",
    "parallel.virtual_pipeline=2",
]


def _peaks(overlap: str) -> list[float]:
    recipe = load_recipe("tiny_gpt", [*PP4_VPP2, f"parallel.overlap_p2p_comm={overlap}"])
    return [stage.peak / 2**20 for stage in estimate(recipe, 4, CPU).stages]


def test_overlap_adds_what_the_allocator_measured_per_stage():
    """Measured (2026-12-07, benchmarks/bench_memory.py on 4 gloo processes, the two runs side by
    side): 167.6, 140.9, 116.6, 92.8 MiB blocking; 168.1, 141.4, 118.1, 94.3 MiB overlapped: one
    tensor more on the first two stages (the next input received ahead), three on the last two
    (also the warm-up's last input and its gradient, left bound to the schedule's variable)."""
    added = [on - off for on, off in zip(_peaks("true"), _peaks("false"))]
    assert added == pytest.approx([0.5, 0.5, 1.5, 1.5], abs=1e-6)


@pytest.mark.parametrize("pipeline, virtual, micro_batches", [(2, 2, 8), (4, 2, 8), (4, 3, 12), (2, 3, 4)])
def test_one_count_per_moment_and_none_in_the_warm_up(pipeline, virtual, micro_batches):
    for rank in range(pipeline):
        moments = in_flight(pipeline, virtual, rank, micro_batches)
        held = overlap_held(pipeline, virtual, rank, micro_batches)
        assert len(held) == len(moments)
        assert all(h == 0 for (_, backward), h in zip(moments, held) if backward is None)
        assert max(held) <= 3


def test_first_stage_never_keeps_the_warm_up_input():
    """pp 2 × vpp 2, 8 micro-batches: the first stage's warm-up ends before a chunk-0 forward, which
    it does not receive; its steady state receives ahead only before its chunk-1 forwards."""
    assert overlap_held(2, 2, 0, 8) == [0] * 5 + [1, 1, 0, 0] * 3 + [0] * 3
    assert overlap_held(2, 2, 1, 8) == [0, 0, 1] + [3] * 12 + [2] * 3
