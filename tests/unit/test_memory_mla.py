"""The memory model's multi-latent attention (planning/activations.py:mla_attention_bytes) against
the tensors a real forward of tiny_deepseek keeps for its backward (one process, CPU kernels), as
tests/unit/test_memory.py checks standard attention."""

import pytest

from planning.memory import chunk_bytes, setup_for
from pretrain.recipe import load_recipe
from tests.unit.test_memory import CPU, SCALARS, _saved_bytes

# On the CPU, MLA's unequal Q/K and V widths run SDPA's math path, which keeps [s, s] scores a GPU's
# fused kernel does not: the attention kernel is recomputed (core_attn) so the comparison holds the
# rest of the layer; its checkpoint still keeps the kernel's inputs and output.
CORE_ATTN = ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn]"]


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize(
    "overrides",
    [[], ["train.precision=bf16"], ["model.mla.q_lora_rank=null"]],
    ids=["fp32", "bf16", "full_rank_query"],
)
def test_mla_kept_bytes_equal_what_a_forward_keeps(overrides):
    """tiny_deepseek's MLA in dense layers (its MoE layers: the test below). Negative
    control (by hand): standard attention's terms for the same model (no latents, one head width)
    miss by 151,584 bytes in fp32."""
    recipe = load_recipe("tiny_deepseek", ["model.seq_length=64", "model.moe.num_experts=null", *CORE_ATTN, *overrides])
    setup = setup_for(recipe, 1, CPU)
    predicted = chunk_bytes(setup, (0, recipe.model.num_layers), first=True, last=True).kept
    assert abs(predicted - _saved_bytes(recipe, micro_batch=2)) <= SCALARS * (recipe.model.num_layers + 1)


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("mtp", [0, 1], ids=["main", "mtp"])
def test_deepseek_moe_layers_kept_bytes_equal_what_a_forward_keeps(mtp):
    """tiny_deepseek whole: MLA with its MoE layers, whose router scores with a sigmoid, picks experts
    within the best group (num_groups 2, group_top_k 1) and normalizes the top-k; capacity with
    padding makes the experts' tokens exact; with its MTP module (planning/mtp.py). Negative controls
    (by hand): without the group and sigmoid terms of moe_layer's router the prediction is 20,396 bytes
    short and this fails; without the MTP items, 1,318,016 bytes short."""
    recipe = load_recipe(
        "tiny_deepseek",
        [
            "model.seq_length=64",
            "model.moe.capacity_factor=1.0",
            "model.moe.pad_to_capacity=true",
            f"model.mtp_num_layers={mtp}",
            *CORE_ATTN,
        ],
    )
    setup = setup_for(recipe, 1, CPU)
    predicted = chunk_bytes(setup, (0, recipe.model.num_layers), first=True, last=True).kept
    # the router's per-expert counts and scalars: 76 bytes per layer (as test_memory's MoE case)
    actual = _saved_bytes(recipe, micro_batch=2)
    assert abs(predicted - actual) <= 2 * SCALARS * (recipe.model.num_layers + 1 + 2 * mtp)
