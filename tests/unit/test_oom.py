"""The out-of-memory report's suggestion (pretrain/oom.py) for tiny_gpt on one CPU rank, whose memory
model predicts a 10.4 MiB peak: a recompute setting, then a smaller micro-batch, then the planner."""

import pytest

from planning.memory import MIB, Target
from pretrain.oom import _capacity_in, cheapest_change
from pretrain.recipe import load_recipe


@pytest.mark.parametrize(
    "capacity_mib, said",
    [
        (
            10.5,
            "the model predicts this fits in 10.5 MiB: the rest is outside it (fragmentation: try "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; another process on the device)",
        ),
        (
            10.0,
            "cheapest change that fits in 10.0 MiB: model.recompute_granularity=selective "
            "model.recompute_modules=[layernorm] (needs 9.4 MiB, +0 % forward compute for recompute)",
        ),
        (
            9.0,
            "cheapest change that fits in 9.0 MiB: model.recompute_granularity=full model.recompute_method=block "
            "model.recompute_num_layers=1 (needs 9.0 MiB, +22 % forward compute for recompute)",
        ),
        (
            5.0,
            "cheapest change that fits in 5.0 MiB: train.micro_batch_size=1 model.recompute_granularity=full "
            "model.recompute_method=block model.recompute_num_layers=3 (needs 4.8 MiB, +67 % forward compute for "
            "recompute)",
        ),
        (
            4.0,
            "no recompute setting or micro-batch fits in 4.0 MiB at this layout: python -m tools.plan_layout "
            "--recipe RECIPE --gpus 1 --gpu-memory-gib 0.00391",
        ),
    ],
)
def test_cheapest_change_that_fits(capacity_mib, said):
    recipe = load_recipe("tiny_gpt", ["data.path=/nonexistent"])
    predicted = int(10.4 * MIB)
    got = cheapest_change(recipe, 1, Target.for_device("cpu", "local"), 257, int(capacity_mib * MIB), predicted)
    assert got == said.replace("RECIPE", str(recipe.source))


def test_capacity_is_read_from_the_allocators_message():
    message = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which"
    assert _capacity_in(message) == int(79.11 * 2**30)
    assert _capacity_in("out of memory") is None
