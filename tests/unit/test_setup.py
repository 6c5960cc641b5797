"""A recipe at a world size (planning/setup.py:validate_for_world): the layout's and the batch
plan's messages."""

import re

import pytest

from common.errors import RecipeError
from planning.setup import validate_for_world
from pretrain.recipe import load_recipe
from tests.helpers.recipes import in_tmp  # noqa: F401  (in_tmp: autouse, each test runs in tmp_path)

# --------------------------------------------------------------------------------------- world size


def test_llama70b_on_a_wrong_world_size():
    r = load_recipe("llama70b")
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, 100)
    assert str(info.value) == (
        "parallel.tensor × parallel.pipeline × parallel.context = 64 does not divide the world size 100"
    )


def test_world_batch_and_expert_messages():
    r = load_recipe(
        "tiny_moe",
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=3", "model.moe.num_experts=6"],
    )
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, 6)
    assert str(info.value) == (
        "train.global_batch_size = 8 is not a multiple of train.micro_batch_size × data-parallel size = 2 × 3 = 6"
    )
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, 8)
    assert str(info.value) == (
        "parallel.expert × parallel.expert_tensor = 3 × 2 does not divide the world size / parallel.pipeline = 8"
    )
    with pytest.raises(RecipeError, match=re.escape("world size must be positive, got 0")):
        validate_for_world(r, 0)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            ["parallel.pipeline=4", "train.global_batch_size=4"],
            4,
            "2 micro-batches per step (train.global_batch_size / (micro_batch_size × data-parallel size)) are "
            "fewer than parallel.pipeline = 4: raise train.global_batch_size",
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.global_batch_size=6"],
            2,
            "3 micro-batches per step are not a multiple of parallel.pipeline = 2, which the interleaved "
            "schedule (parallel.virtual_pipeline) needs",
        ),
    ],
)
def test_micro_batch_messages_for_pipelines(overrides, world, message):
    r = load_recipe("tiny_gpt", overrides)
    with pytest.raises(RecipeError) as info:
        validate_for_world(r, world)
    assert str(info.value) == message
