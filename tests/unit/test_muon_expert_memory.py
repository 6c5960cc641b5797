"""The planner's Muon temporaries for grouped experts (planning/muon_memory.py) against the CPU
allocator's peak of Muon's real step (pretrain/muon.py) over tiny_moe's stacked experts, with
model.moe.grouped_gemm = true: per-expert Newton-Schulz on [experts, rows, cols] stacks holds a few
whole stacks in fp32, more than the largest single matrix.

Measured 2026-12-07 (torch 2.13 CPU): 786,432 bytes without the distributed optimizer (3 fc1
stacks of 8 x 128 x 64 fp32: update, result, [gate; up] rejoined), 1,048,576 with it (+ the
reassembled copy), both exactly the prediction. Negative control (by hand): the old term alone,
5 x fp32 x the largest matrix (`largest_muon_matrix`, 225,280 bytes), fails every case. Expert
parallel 2 on 2 ranks (each rank's 4 experts): 393,216 and 524,288 bytes on both ranks, again
exact. Not measured here: expert tensor parallelism's gathers."""

import types

import pytest
import torch

from planning.memory import setup_for
from planning.muon_memory import muon_temporaries
from pretrain.muon import Matrix, MuonAdamW, MuonSettings, model_matrices
from pretrain.recipe import load_recipe

BYTE_VOCAB = 257
OVERRIDES = ["optimizer.name=muon", "model.moe.grouped_gemm=true"]


def _settings(cfg) -> MuonSettings:
    dtype = torch.float32 if cfg.ns_dtype == "fp32" else torch.bfloat16
    return MuonSettings(
        cfg.momentum, cfg.nesterov, cfg.ns_steps, cfg.ns_coefficients, cfg.ns_eps, dtype, cfg.adjust_lr, cfg.split_qkv
    )


def _measured_step_bytes(recipe, distributed: bool, build=None, dp_groups=None) -> int:
    """Bytes live at the peak of one Muon step above those live when it starts. `distributed`: each
        matrix's main tensor is the distributed optimizer's flat fp32 range of it (here one rank holds
        the whole range), so the step takes its reassembling path. `dp_groups`: the dense and the expert
    data-parallel groups it reassembles over (default: the world)."""
    import torch.distributed as dist

    from model.gpt import ModelBuild, build_model_chunks
    from pretrain.profiling import cpu_allocator_peak_mib

    chunks = build_model_chunks(recipe.model, build or ModelBuild(), BYTE_VOCAB)
    groups = types.SimpleNamespace(tp=None, expt_tp=None)
    matrices: list[Matrix] = []
    for _, param, matrix in model_matrices(chunks, groups, True):
        if distributed:
            matrix.main = torch.zeros(param.numel())
            dp = dist.group.WORLD if dp_groups is None else dp_groups["experts" in matrix.name]
            matrix.flat, matrix.dp_group = (0, param.numel()), dp
        else:
            matrix.main = param
        matrix.main.grad = torch.randn(matrix.main.shape)
        matrices.append(matrix)
    adamw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    groups_ = torch.optim.AdamW([m.main for m in matrices], **adamw).param_groups  # as megatron-core's
    optimizer = MuonAdamW(groups_, adamw, _settings(recipe.optimizer), matrices)
    start, peak = cpu_allocator_peak_mib(optimizer.step)
    return round((peak - start) * 2**20)


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("distributed", [False, True])
def test_grouped_expert_temporaries_match_the_allocator(distributed):
    recipe = load_recipe("tiny_moe", [*OVERRIDES, f"parallel.distributed_optimizer={str(distributed).lower()}"])
    measured = _measured_step_bytes(recipe, distributed)
    predicted = muon_temporaries(setup_for(recipe, 1), 0, 1)
    assert abs(predicted / measured - 1) <= 0.03, (predicted, measured)  # measured 2026-12-07: exactly equal


def _ep2_rank(rank: int, world_size: int) -> list[int]:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.gpt import ModelBuild
    from parallel.layout import Layout, init_model_parallel
    from pretrain.profiling import count_cpu_allocations_on_every_thread
    from upstream import cpu

    count_cpu_allocations_on_every_thread()  # gloo's threads free blocks too (pretrain/profiling.py)

    layout = Layout(world_size=world_size, expert=2)
    with cpu.applied():
        init_model_parallel(layout)
        try:
            model_parallel_cuda_manual_seed(1234)
            dp_groups = {False: ps.get_data_parallel_group(), True: ps.get_expert_data_parallel_group()}
            measured = []
            for distributed in (False, True):
                recipe = load_recipe(
                    "tiny_moe", [*OVERRIDES, f"parallel.distributed_optimizer={str(distributed).lower()}"]
                )
                measured.append(_measured_step_bytes(recipe, distributed, ModelBuild(layout=layout), dp_groups))
            return measured
        finally:
            ps.destroy_model_parallel()


def test_expert_parallel_ranks_hold_their_local_experts_stacks():
    """Expert parallel 2 on 2 ranks: each rank steps its 4 experts' stacks (expert data parallel 1)."""
    from tests.helpers.spawn import run_distributed

    for rank, measured in enumerate(run_distributed(_ep2_rank, 2)):
        for distributed, bytes_ in zip((False, True), measured):
            recipe = load_recipe(
                "tiny_moe",
                [*OVERRIDES, "parallel.expert=2", f"parallel.distributed_optimizer={str(distributed).lower()}"],
            )
            predicted = muon_temporaries(setup_for(recipe, 2), 0, 1)
            assert abs(predicted / bytes_ - 1) <= 0.03, (rank, distributed, predicted, bytes_)
