"""The layout search's newer dimensions (planning/search.py): expert-tensor parallelism and FSDP
are enumerated, every candidate is a layout the run accepts, and FSDP's step time gathers the
weights twice (forward and backward) where the distributed optimizer gathers them once."""

import pytest

from model.moe_config import moe_layer_pattern
from planning import search
from planning.gpus import GPUS
from planning.memory import Target, setup_for
from planning.setup import validate_for_world
from planning.step_time import step_time
from pretrain.recipe import load_recipe


def test_moe_search_splits_experts_apart_from_the_dense_layers():
    recipe = load_recipe("tiny_moe", ["train.global_batch_size=8"])
    ordered = search.candidates(recipe, 8, GPUS["h100"], 256)
    split = [c for c in ordered if c.overrides["parallel.expert_tensor"] == 1 and c.overrides["parallel.tensor"] > 1]
    assert split, "no candidate with expert_tensor 1 under tensor > 1"
    for c in split[:5]:
        validate_for_world(c.setup.recipe, 8)
        assert c.setup.layout.expert_tensor == 1


def test_dense_local_search_tries_fsdp_and_its_gathers_count_twice():
    recipe = load_recipe("tiny_gpt", ["train.global_batch_size=8"])
    ordered = search.candidates(recipe, 4, GPUS["h100"], 256)
    for sharding in ("zero3", "zero2"):
        fsdp = [c for c in ordered if c.overrides["parallel.fsdp"] == sharding]
        assert fsdp and all(c.overrides["parallel.pipeline"] == 1 for c in fsdp)
        validate_for_world(fsdp[0].setup.recipe, 4)

    def gather(*overrides):
        r = load_recipe("tiny_gpt", ["train.global_batch_size=8", *overrides])
        terms = {t.name: t for t in step_time(setup_for(r, 4, Target(), 256), GPUS["h100"]).terms}
        return terms["data_all_gather"].seconds

    zero3 = gather("parallel.fsdp=zero3", "parallel.distributed_optimizer=false")
    assert zero3 == pytest.approx(2 * gather("parallel.distributed_optimizer=true"))
    assert gather("parallel.fsdp=zero2", "parallel.distributed_optimizer=false") == pytest.approx(zero3 / 2)


def test_search_tries_lighter_first_and_last_stages():
    """4 layers on 3 pipeline stages only split unevenly: 1 / 2 / 1 (the first and last stages make
    room for the embedding and the loss); the run accepts it. Negative control (by hand): with
    _pipeline_splits' uneven branch removed, no candidate has pipeline 3 and this fails."""
    recipe = load_recipe("tiny_gpt", ["train.global_batch_size=8"])
    ordered = search.candidates(recipe, 3, GPUS["h100"], 256)
    uneven = [c for c in ordered if c.overrides["parallel.pipeline"] == 3]
    assert uneven and {
        (c.overrides["parallel.first_stage_layers"], c.overrides["parallel.last_stage_layers"]) for c in uneven
    } == {(1, 1)}
    validate_for_world(uneven[0].setup.recipe, 3)
    assert uneven[0].setup.stage_ranges == [((0, 1),), ((1, 3),), ((3, 4),)]
    assert "3 1/1" in search.table(uneven[:1], GPUS["h100"], 3)[1]


def test_expert_tensor_parallelism_gathers_the_routed_tokens():
    """Experts split over 2 expert-tensor ranks exchange every routed token again (all-gather and
    reduce-scatter, forward and backward); whole on a rank (expert_tensor 1) they do not. Negative
    control (by hand): without step_time's expert-tensor term both are equal and this fails."""
    base = ["train.global_batch_size=8", "parallel.tensor=2", "parallel.expert=2", "parallel.sequence_parallel=true"]

    def expert(*overrides):
        setup = setup_for(load_recipe("tiny_moe", [*base, *overrides]), 4, Target(), 256)
        return step_time(setup, GPUS["h100"]).expert, setup

    split, setup = expert("parallel.expert_tensor=2")
    whole, _ = expert("parallel.expert_tensor=1")
    m, shape = setup.model, setup.shape
    moe_layers = sum(moe_layer_pattern(m))
    gather = 4 * shape.sharded_tokens * m.moe.top_k * m.hidden_size * shape.dtype_bytes / (450e9)
    assert split - whole == pytest.approx(gather * moe_layers * setup.micro_batches)
