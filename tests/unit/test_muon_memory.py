"""The memory model and the planner under optimizer.name = muon: one fp32 momentum for each Muon
matrix instead of Adam's two moments, counted against the parameters a real model hands Muon."""

import pytest

from model.gpt import ModelBuild, build_model_chunks
from planning.gpus import GPUS
from planning.memory import Target, estimate
from planning.step_time import step_time
from pretrain.muon import is_muon_param
from pretrain.recipe import load_recipe

BYTE_VOCAB = 257
CPU = Target.for_device("cpu", "local")


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("recipe_name", ["tiny_gpt", "tiny_moe"])
def test_muon_saves_one_fp32_moment_per_matrix_parameter(recipe_name):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    adamw = load_recipe(recipe_name, [])
    muon = load_recipe(recipe_name, ["optimizer.name=muon"])
    (model,) = build_model_chunks(adamw.model, ModelBuild(), BYTE_VOCAB)
    matrices = sum(p.numel() for n, p in model.named_parameters() if is_muon_param(n, p))
    (with_adamw,) = estimate(adamw, 1, CPU).stages
    (with_muon,) = estimate(muon, 1, CPU).stages
    assert with_adamw.optimizer - with_muon.optimizer == 4 * matrices


def test_planner_counts_muon_steps_on_the_whole_matrices():
    """Tensor parallelism does not shrink the iteration (every rank runs it on the whole matrix)
    and adds the gathers; AdamW's step is not in the planner."""
    from planning.memory import setup_for

    plain = ["optimizer.name=muon", "parallel.distributed_optimizer=false"]
    one = setup_for(load_recipe("llama_1b", plain), 8)
    tp = setup_for(load_recipe("llama_1b", [*plain, "parallel.tensor=8"]), 8)
    adamw = setup_for(load_recipe("llama_1b", []), 8)
    assert step_time(adamw, GPUS["h100"]).optimizer == 0.0
    assert step_time(tp, GPUS["h100"]).optimizer > step_time(one, GPUS["h100"]).optimizer > 0.0
