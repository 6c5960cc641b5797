"""Each CPU-layer patch: the upstream megatron-core site fails without it and works with it."""

import pytest
import torch

from parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is for CPU-only runs")


def _seed_and_fork():
    """tensor_parallel/random.py: model_parallel_cuda_manual_seed + tracker.fork (dropout in TP regions)."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = mcore_random.get_cuda_rng_tracker()
    outside_before = torch.rand(4)
    with tracker.fork():
        inside = torch.rand(4)
    # The fork draws from the tensor-parallel stream, seeded seed + 2718 + tp_rank upstream;
    # without the manual_seed patch torch.cuda.manual_seed is silently queued and never runs.
    expected = torch.rand(4, generator=torch.Generator().manual_seed(123 + 2718 + 1))
    assert torch.equal(inside, expected)
    return outside_before, inside


def _global_memory_buffer():
    """utils.py:631: GlobalMemoryBuffer allocates on torch.cuda.current_device()."""
    from megatron.core.utils import GlobalMemoryBuffer

    return GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "t")


def _sequence_parallel_linear_backward():
    """tensor_parallel/layers.py:551: the SP reduce-scatter buffer is allocated inside an autograd
    backward, where no torch function mode applies, on torch.cuda.current_device()."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.destroy_global_memory_buffer()
    parallel_state._set_global_memory_buffer()  # the forward all-gather's buffer (no patch involved)
    try:
        x = torch.randn(4, 1, 3, requires_grad=True)
        w = torch.randn(5, 3, requires_grad=True)
        y = linear_with_grad_accumulation_and_async_allreduce(
            x, w, None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
            sequence_parallel=True, tp_group=dist.group.WORLD,
        )
        y.sum().backward()
        assert torch.allclose(x.grad, w.sum(0).expand(4, 1, 3))
    finally:
        parallel_state.destroy_global_memory_buffer()
        if owns_group:
            dist.destroy_process_group()


def _fp32_optimizer():
    """optimizer/optimizer.py:907: FP32Optimizer keeps its scale in torch.tensor(device='cuda')."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    param = torch.nn.Parameter(torch.ones(3))
    return FP32Optimizer(torch.optim.AdamW([param]), OptimizerConfig(lr=1e-3), lambda *a: None)


def _clip_grads():
    """optimizer/clip_grads.py:167: asserts param.grad.type() == 'torch.cuda.FloatTensor'."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=float(param.grad.norm()))
    return param.grad


def _dist_checkpoint_save():
    """dist_checkpointing/strategies/filesystem_async.py:230: torch.cuda.synchronize before writing."""
    import tempfile

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0), replica_id=0)}
        template = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4), replica_id=0)}
        with tempfile.TemporaryDirectory() as tmp:
            dist_checkpointing.save(state, tmp)
            loaded = dist_checkpointing.load(template, tmp)
        assert torch.equal(loaded["w"], torch.arange(4.0))
    finally:
        if owns_group:
            dist.destroy_process_group()


SITES = {
    "rng.get_state": _seed_and_fork,
    "rng.manual_seed": _seed_and_fork,
    "rng.set_state": _seed_and_fork,
    "rng.get_cuda_state": _seed_and_fork,
    "device.current_device": _sequence_parallel_linear_backward,
    "device.mode": _fp32_optimizer,
    "device.synchronize": _dist_checkpoint_save,
}


@pytest.mark.parametrize("name", sorted(SITES))
def test_site_fails_without_its_patch(name):
    with cpu_compat.applied(skip=(name,)):
        with pytest.raises((RuntimeError, AssertionError, AttributeError)):
            SITES[name]()


@pytest.mark.parametrize("name", sorted(SITES))
def test_site_works_with_the_layer(name):
    with cpu_compat.applied():
        SITES[name]()


def test_every_patch_has_a_site_test():
    assert sorted(cpu_compat.patch_names()) == sorted(SITES)


def test_global_memory_buffer_allocates_on_cpu():
    with cpu_compat.applied(skip=("device.current_device",)):
        with pytest.raises((RuntimeError, AssertionError)):
            _global_memory_buffer()
    with cpu_compat.applied():
        assert _global_memory_buffer().device.type == "cpu"


class _FakeContextGroup:
    """What get_pos_emb_on_this_cp_rank asks of its group: size and rank."""

    def size(self):
        return 2

    def rank(self):
        return 1


def test_rope_slice_per_context_rank_needs_the_mode():
    """models/common/embeddings/rope_utils.py:62: pin_memory=True, then .cuda()."""
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    emb = torch.arange(8.0).view(8, 1, 1, 1)  # [s, 1, 1, dim]
    with cpu_compat.applied(skip=("device.mode",)):
        with pytest.raises(RuntimeError):
            get_pos_emb_on_this_cp_rank(emb, 0, _FakeContextGroup())
    with cpu_compat.applied():
        sliced = get_pos_emb_on_this_cp_rank(emb, 0, _FakeContextGroup())
    # 4 chunks of 2 positions; CP rank 1 of 2 holds chunks 1 and 2.
    assert sliced.view(-1).tolist() == [2.0, 3.0, 4.0, 5.0]


def test_type_check_sites_pass_only_with_the_mode():
    with cpu_compat.applied(skip=("device.mode",)):
        with pytest.raises(AssertionError):
            _clip_grads()
    with cpu_compat.applied():
        grad = _clip_grads()
    assert torch.allclose(grad.norm(), torch.tensor(1.0), atol=1e-5)


def test_tensor_parallel_rng_is_separate_and_deterministic():
    with cpu_compat.applied():
        before1, inside1 = _seed_and_fork()
        before2, inside2 = _seed_and_fork()
    assert torch.equal(inside1, inside2) and torch.equal(before1, before2)
    # The fork draws from the TP stream (seed + 2718 + tp_rank), not the default one.
    assert not torch.equal(before1, inside1)


def test_layer_is_reverted_and_never_enabled_on_cuda():
    original = torch.cuda.current_device
    with cpu_compat.applied():
        assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.current_device is original
    assert cpu_compat.enable(torch.device("cuda", 0)) is False
