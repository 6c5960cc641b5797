"""The `fp8` section's checks against the model and the layout (model/config.py:check_fp8): every
message, and the combinations that run."""

import pytest

from pretrain.recipe import load_recipe
from tests.helpers.recipes import error_of, in_tmp  # noqa: F401  (in_tmp: autouse, each test runs in tmp_path)

# ---------------------------------------------------------------------------------------------- fp8


FP8 = ["train.precision=bf16", "fp8.enabled=true"]


TE = ["model.transformer_impl=transformer_engine"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fp8.enabled=true"], "fp8.enabled = true requires train.precision = bf16, got fp32"),
        (
            [*FP8, "fp8.recipe=delayed"],
            "fp8.recipe = delayed needs model.transformer_impl = transformer_engine (transformer-engine >= 1.7); "
            "the local spec runs tensorwise and rowwise",
        ),
        (
            [*FP8, "fp8.recipe=blockwise"],
            "fp8.recipe = blockwise needs model.transformer_impl = transformer_engine (transformer-engine >= 2.3); "
            "the local spec runs tensorwise and rowwise",
        ),
        (
            [*FP8, "fp8.recipe=mxfp8"],
            "fp8.recipe = mxfp8 needs model.transformer_impl = transformer_engine (transformer-engine >= 2.1); "
            "the local spec runs tensorwise and rowwise",
        ),
        (
            [*FP8, *TE, "fp8.recipe=rowwise"],
            "fp8.recipe = rowwise runs on the local spec only (model.transformer_impl = local); "
            "transformer-engine's recipes are delayed | tensorwise | blockwise | mxfp8",
        ),
        (
            [*FP8, "fp8.params=true"],
            "fp8.params = true (FP8 primary weights) needs model.transformer_impl = transformer_engine",
        ),
        (
            [*FP8, "fp8.amax_history_len=16"],
            "fp8.amax_history_len applies to fp8.recipe = delayed only; tensorwise scales from the current amax",
        ),
        (
            [*FP8, *TE, "fp8.recipe=mxfp8", "fp8.amax_compute_algo=max"],
            "fp8.amax_compute_algo applies to fp8.recipe = delayed only; mxfp8 scales from the current amax",
        ),
        ([*FP8, "fp8.margin=-1"], "fp8.margin must be non-negative, got -1"),
        (
            [*FP8, "fp8.recipe=hybrid"],
            "fp8.recipe must be one of tensorwise | rowwise | delayed | blockwise | mxfp8, got 'hybrid'",
        ),
        (
            [*FP8, *TE, "fp8.recipe=delayed", "fp8.first_last_layers_bf16=1"],
            "fp8.first_last_layers_bf16 cannot be combined with fp8.recipe = delayed",
        ),
        (
            [*FP8, "fp8.first_last_layers_bf16=2"],
            "fp8.first_last_layers_bf16 = 2 at each end leaves no FP8 layer in model.num_layers = 4",
        ),
        (
            [*FP8, *TE, "model.num_layers=8", "parallel.pipeline=4", "fp8.first_last_layers_bf16=3"],
            "fp8.first_last_layers_bf16 = 3 exceeds the 2 layers of a pipeline stage (megatron-core's limit with "
            "transformer-engine)",
        ),
        (
            [*FP8, "model.moe.num_experts=4", "parallel.expert=2"],
            "fp8 on the local spec needs parallel.expert = 1, got 2: an expert's FP8 scales would span the tokens "
            "of several data-parallel ranks, changing its numerics with the layout (use model.transformer_impl = "
            "transformer_engine)",
        ),
        (
            [
                *FP8,
                "model.moe.num_experts=4",
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "parallel.expert_tensor=1",
            ],
            "fp8 on the local spec needs parallel.expert_tensor = parallel.tensor, got 1 and 2",
        ),
    ],
)
def test_fp8_messages(overrides, message):
    assert error_of("tiny_gpt", overrides) == message


def test_fp8_combinations_that_run():
    for extra in (
        [],
        ["fp8.recipe=rowwise", "fp8.format=e4m3", "fp8.first_last_layers_bf16=1"],
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2", "parallel.context=2"],
        ["model.moe.num_experts=4", "parallel.tensor=2", "parallel.sequence_parallel=true"],
        [*TE, "fp8.recipe=delayed", "fp8.amax_history_len=1024", "fp8.amax_compute_algo=max", "fp8.margin=0"],
        [*TE, "fp8.recipe=mxfp8", "fp8.params=true", "model.moe.num_experts=4", "parallel.expert=2"],
    ):
        load_recipe("tiny_gpt", [*FP8, *extra])
    # fp8.enabled = false is a plain bf16/fp32 run whatever the other keys say (a baseline from an FP8 recipe)
    assert not load_recipe("tiny_gpt", ["fp8.recipe=delayed", "fp8.params=true"]).fp8.enabled
