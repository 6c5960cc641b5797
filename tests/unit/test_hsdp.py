"""parallel.fsdp_shard_size (HSDP): refused in one line where it cannot apply; the layout's shard
groups; the memory model divides the sharded state by the shard size and the planner adds the
all-reduce across the groups."""

import pytest

from common.errors import RecipeError
from parallel.layout import Layout
from planning.gpus import GPUS
from planning.memory import estimate, setup_for
from planning.step_time import step_time
from pretrain.recipe import load_recipe


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        (
            "tiny_gpt",
            ["parallel.fsdp_shard_size=2"],
            "parallel.fsdp_shard_size = 2 is only read with parallel.fsdp (zero2 or zero3): set parallel.fsdp, "
            "or leave parallel.fsdp_shard_size null",
        ),
        (
            "tiny_moe",
            ["parallel.fsdp=zero3", "parallel.fsdp_shard_size=1"],
            "parallel.fsdp_shard_size = 1 with model.moe is not built yet (experts are sharded over their own "
            "expert-data-parallel group, which hybrid sharding does not split): leave it null",
        ),
    ],
)
def test_shard_size_without_fsdp_or_with_experts_is_refused(recipe, overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, overrides)
    assert str(err.value) == message


def test_shard_size_must_divide_the_data_times_context_ranks():
    with pytest.raises(RecipeError) as err:
        Layout(world_size=8, tensor=2, fsdp="zero3", fsdp_shard_size=3)
    assert str(err.value) == (
        "parallel.fsdp_shard_size = 3 does not divide the 4 data × context-parallel ranks "
        "(world size 8 / (tensor × pipeline))"
    )
    hsdp = Layout(world_size=16, tensor=2, context=2, fsdp="zero2", fsdp_shard_size=2)
    assert (hsdp.fsdp_shards, hsdp.fsdp_replicas) == (2, 4)
    assert hsdp.describe().endswith("fully sharded (zero2) in groups of 2 x 4 replicas")
    assert Layout(world_size=8, fsdp="zero3").fsdp_replicas == 1


def test_memory_divides_by_the_shard_size_and_planner_adds_the_replica_all_reduce():
    """llama_1b on 32 ranks: shards over 8 (one node) hold 4x the state of shards over 32; the
    reduce-scatter and all-gather stay inside the node (NVLink), the all-reduce across the 4 groups
    crosses the network."""
    fsdp = ["parallel.fsdp=zero3", "parallel.distributed_optimizer=false"]
    everywhere = load_recipe("llama_1b", fsdp)
    per_node = load_recipe("llama_1b", [*fsdp, "parallel.fsdp_shard_size=8"])
    (a,) = estimate(everywhere, 32).stages
    (b,) = estimate(per_node, 32).stages
    for term in ("weights", "grads", "optimizer"):
        assert getattr(b, term) == pytest.approx(4 * getattr(a, term), rel=1e-6)
    assert b.gathered == a.gathered  # whole layers are gathered either way
    h100 = GPUS["h100"]
    plain, hybrid = step_time(setup_for(everywhere, 32), h100), step_time(setup_for(per_node, 32), h100)
    terms = {t.name: t for t in hybrid.terms}
    assert {t.name: t for t in plain.terms}["hsdp_all_reduce"].seconds == 0.0
    assert terms["hsdp_all_reduce"].exposed > 0.0
    assert terms["data_reduce_scatter"].seconds < {t.name: t for t in plain.terms}["data_reduce_scatter"].seconds
