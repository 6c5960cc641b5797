"""The layout search's newer dimensions (planning/search.py): expert-tensor parallelism and FSDP
are enumerated, every candidate is a layout the run accepts, and FSDP's step time gathers the
weights twice (forward and backward) where the distributed optimizer gathers them once."""

import pytest

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
    fsdp = [c for c in ordered if c.overrides["parallel.fsdp"] == "zero3"]
    assert fsdp and all(c.overrides["parallel.pipeline"] == 1 for c in fsdp)
    validate_for_world(fsdp[0].setup.recipe, 4)

    def gather(*overrides):
        r = load_recipe("tiny_gpt", ["train.global_batch_size=8", *overrides])
        terms = {t.name: t for t in step_time(setup_for(r, 4, Target(), 256), GPUS["h100"]).terms}
        return terms["data_all_gather"].seconds

    zero3 = gather("parallel.fsdp=zero3", "parallel.distributed_optimizer=false")
    assert zero3 == pytest.approx(2 * gather("parallel.distributed_optimizer=true"))
