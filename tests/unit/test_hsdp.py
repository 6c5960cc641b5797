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


def test_node_shard_size_is_the_data_ranks_of_one_node_from_local_world_size(monkeypatch):
    """fsdp_shard_size = node: torchrun's LOCAL_WORLD_SIZE processes per node hold node / tensor
    consecutive data × context ranks (tensor is innermost in megatron-core's order); all of them when
    a pipeline stage fits in a node; refused in one line where tensor groups straddle nodes or the
    processes per node are unknown (the dry run without --gpus-per-node)."""
    from parallel.layout import node_size_from_env
    from planning.setup import validate_for_world

    node = ["parallel.fsdp=zero3", "parallel.fsdp_shard_size=node", "train.global_batch_size=32"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    layout, _ = validate_for_world(load_recipe("tiny_gpt", [*node, "parallel.tensor=2"]), 16, node_size_from_env())
    assert (layout.fsdp_shards, layout.fsdp_replicas) == (2, 4)
    assert layout.describe().endswith("in groups of 2 x 4 replicas (fsdp_shard_size: node = 2)")
    layout, _ = validate_for_world(load_recipe("tiny_gpt", [*node, "parallel.context=2"]), 16, node_size_from_env())
    assert (layout.data, layout.fsdp_shards, layout.fsdp_replicas) == (8, 4, 4)  # data x context = 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    layout, _ = validate_for_world(load_recipe("tiny_gpt", [*node, "parallel.pipeline=2"]), 8, node_size_from_env())
    assert (layout.fsdp_shards, layout.fsdp_replicas) == (4, 1)  # one node holds both stages
    with pytest.raises(RecipeError) as err:
        Layout(world_size=12, tensor=2, fsdp="zero3", fsdp_shard_size="node", node_size=3)
    assert str(err.value) == (
        "parallel.fsdp_shard_size = node: a node of 3 processes does not hold whole tensor-parallel groups of "
        "the world of 12 (parallel.tensor = 2): set parallel.fsdp_shard_size to a number"
    )
    with pytest.raises(RecipeError) as err:
        validate_for_world(load_recipe("tiny_gpt", node), 8)
    assert str(err.value) == (
        "parallel.fsdp_shard_size = node needs the processes per node: give the dry run --gpus-per-node N, "
        "or set parallel.fsdp_shard_size to a number"
    )
