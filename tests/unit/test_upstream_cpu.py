"""Each CPU-layer patch: the upstream megatron-core site fails without it and works with it."""

import pathlib

import pytest
import torch

from tests.distributed.test_pipeline_outputs import gloo_send_after_free
from tests.helpers.spawn import run_distributed
from upstream import cpu as cpu_compat


@pytest.fixture(autouse=True)
def _layer_off():
    """Each site test applies the layer itself (with one patch skipped): a layer an earlier in-process
    test left on for the whole process (cpu.enable: init_single_process, a dry run's meta-device
    count) would make every unpatched site pass."""
    cpu_compat.disable()


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
    assert torch.equal(inside, expected), "the fork did not draw from the tensor-parallel stream (seed 123 + 2718 + 1)"
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
            x,
            w,
            None,
            gradient_accumulation_fusion=False,
            allreduce_dgrad=False,
            sequence_parallel=True,
            tp_group=dist.group.WORLD,
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


def _moe_alltoall_forward_backward():
    """transformer/moe/token_dispatcher.py:445 torch.cuda.Stream(), :871 torch.cuda.current_stream():
    an MoE layer with the alltoall dispatcher, forward and backward, on one process."""
    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    from parallel.layout import Layout, init_model_parallel, shutdown

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # built once per process, upstream caches it
    try:
        init_model_parallel(Layout(world_size=1))
        model_parallel_cuda_manual_seed(1)
        config = TransformerConfig(
            num_layers=1,
            hidden_size=8,
            num_attention_heads=2,
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=16,
            moe_token_dispatcher_type="alltoall",
            add_bias_linear=False,
            use_cpu_initialization=True,
            calculate_per_token_loss=True,
        )
        layer = MoELayer(config, get_gpt_layer_local_spec(num_experts=4).submodules.mlp.submodules)
        layer.set_layer_number(1)
        x = torch.randn(5, 2, 8, requires_grad=True)
        out, _ = layer(x)
        out.sum().backward()
        assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    finally:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None
        shutdown()


def _alltoall_split_sizes():
    """transformer/moe/token_dispatcher.py:876-893: split sizes stay tensors on the CPU, and
    all_to_all_single (mappings.py:538) only takes integer lists ("incompatible function arguments")."""
    import torch.distributed as dist
    from megatron.core.transformer.moe import token_dispatcher

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([4]), as_numpy=True)
        out = torch.empty(4)
        dist.all_to_all_single(out, torch.arange(4.0), output_split_sizes=splits, input_split_sizes=splits)
        assert out.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()


def _uneven_gather(rank: int, world: int, use_patch: bool):
    """Rank r gathers 2 + r rows through megatron's gather with split sizes; the gathered first
    column, or gloo's error."""
    from megatron.core.tensor_parallel.mappings import _gather_along_first_dim

    with cpu_compat.applied(skip=() if use_patch else ("dist.uneven_all_gather",)):
        piece = torch.full((2 + rank, 3), float(rank))  # 2 rows on rank 0, 3 on rank 1
        try:
            return _gather_along_first_dim(piece, torch.distributed.group.WORLD, output_split_sizes=[2, 3])[
                :, 0
            ].tolist()
        except RuntimeError as exc:
            return str(exc)


def _uneven_all_gather():
    """tensor_parallel/mappings.py:150: all_gather with output_split_sizes, which the alltoall
    dispatcher uses under tensor × expert parallelism; gloo needs equal sizes. Two processes."""
    use_patch = (
        torch.distributed.all_gather.__name__ == "all_gather"
        and torch.distributed.all_gather.__module__ == cpu_compat.__name__
    )
    for outcome in run_distributed(_uneven_gather, 2, use_patch):
        if not isinstance(outcome, list):
            raise RuntimeError(outcome)
        assert outcome == [0.0, 0.0, 1.0, 1.0, 1.0]


def _recompute_replay(without_output: bool):
    """tensor_parallel/random.py:535 and :664: a recompute replays the forward inside autograd's
    backward, where no torch function mode applies, so upstream attention's causal mask
    (transformer/utils.py:35, device="cuda") fails there though it worked in the forward."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.utils import get_default_causal_mask

    from parallel.layout import Layout, init_model_parallel, shutdown

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        init_model_parallel(Layout(world_size=1))
        model_parallel_cuda_manual_seed(1)
        masked = lambda x: x.masked_fill(get_default_causal_mask(x.shape[0]), 0.0)
        x = torch.randn(4, 4, requires_grad=True)
        if without_output:
            checkpoint = tensor_parallel.CheckpointWithoutOutput()
            out = checkpoint.checkpoint(masked, x) * 2
            checkpoint.discard_output_and_register_recompute(out)
        else:
            out = tensor_parallel.checkpoint(masked, False, x) * 2
        out.sum().backward()
        assert torch.equal(x.grad, 2 * torch.ones(4, 4).tril())
    finally:
        shutdown()


def _generation_timing_events():
    """inference/text_generation_controllers/text_generation_controller.py:1163,1337,1346: the static
    generation loop records a timing event per token and reads the time between them."""
    import time

    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    events[0].record()
    time.sleep(0.01)
    events[1].record()
    events[1].synchronize()
    assert 5.0 < events[0].elapsed_time(events[1]) < 1000.0


def _pipeline_logits_broadcast():
    """inference/communication_utils.py:31: generation under pipeline parallelism broadcasts the
    last stage's logits, asserting `tensor.is_cuda` first (a bare assert: named here by its function)."""
    import traceback

    import torch.distributed as dist
    from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        logits = torch.arange(6.0).view(1, 2, 3)
        out = broadcast_from_last_pipeline_stage([1, 2, 3], torch.float32, logits, pp_group=dist.group.WORLD)
        assert torch.equal(out, logits)
    except AssertionError as exc:
        raise AssertionError(f"{traceback.extract_tb(exc.__traceback__)[-1].name} asserted") from exc
    finally:
        dist.destroy_process_group()


def _fsdp_wrap():
    """distributed/torch_fully_sharded_data_parallel.py:81: the FSDP2 wrapper's mesh is a CUDA mesh,
    and fully_shard asks the CUDA device for its index ("device(): argument 'index' ... must be int")."""
    import torch.distributed as dist
    from megatron.core.distributed import TorchFullyShardedDataParallel, TorchFullyShardedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
        module = torch.nn.Sequential(torch.nn.Linear(4, 4))
        wrapped = TorchFullyShardedDataParallel(
            config, TorchFullyShardedDataParallelConfig(), module, process_group=dist.group.WORLD
        )
        assert wrapped.module[0].weight.device_mesh.device_type == "cpu"
    finally:
        dist.destroy_process_group()


def _host_optimizer_step():
    """optimizer/cpu_offloading/hybrid_optimizer.py:101,299,310-323: megatron-core's offloading
    optimizer gives a parameter a host copy when `param.is_cuda`; on a CPU run none is, every
    parameter lands in its host optimizer with no device twin, and the step's lookup of it fails
    (KeyError). With the layer: half the elements stepped on the host, half on the device, each
    as torch's AdamW steps it."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hybrid = HybridDeviceOptimizer(
        params,
        offload_fraction=0.5,
        cpu_optimizer_cls=torch.optim.AdamW,
        gpu_optimizer_cls=torch.optim.AdamW,
        param_update_in_fp32=True,
        lr=0.1,
    )
    reference = torch.optim.AdamW(twins, lr=0.1)
    for p in params + twins:
        p.grad = torch.linspace(-1.0, 1.0, p.numel()).view(p.shape)
    hybrid.step()
    reference.step()
    assert list(hybrid.gpu_params_map_cpu_copy) == [params[0]] and len(hybrid.cpu_optimizers) == 1
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p, twin, rtol=0, atol=0)


NO_CUDA = (AssertionError, "Torch not compiled with CUDA enabled")
WRONG_STREAM = (AssertionError, "the fork did not draw from the tensor-parallel stream")

# Each site, and the error it raises without its patch: the upstream failure itself, not just any
# exception (a broken test helper must not pass for a needed patch).
SITES = {
    "rng.get_state": (_seed_and_fork, *NO_CUDA),
    # without these two the CUDA seeding is silently skipped: dropout would draw from the wrong stream
    "rng.manual_seed": (_seed_and_fork, *WRONG_STREAM),
    "rng.set_state": (_seed_and_fork, *WRONG_STREAM),
    "rng.get_cuda_state": (_seed_and_fork, *NO_CUDA),
    "device.current_device": (_sequence_parallel_linear_backward, *NO_CUDA),
    "device.mode": (_fp32_optimizer, *NO_CUDA),
    "device.synchronize": (_dist_checkpoint_save, *NO_CUDA),
    "stream.Stream": (_moe_alltoall_forward_backward, RuntimeError, "torch.cuda.Stream requires CUDA support"),
    "stream.current_stream": (_moe_alltoall_forward_backward, *NO_CUDA),
    "stream.Event": (_generation_timing_events, RuntimeError, "Tried to instantiate dummy base class Event"),
    "inference.is_cuda": (_pipeline_logits_broadcast, AssertionError, "^_is_cuda asserted$"),
    "moe.split_sizes": (_alltoall_split_sizes, TypeError, "all_to_all_single\\(\\): incompatible function arguments"),
    "dist.uneven_all_gather": (_uneven_all_gather, RuntimeError, "ProcessGroupGloo::allgather: invalid tensor size"),
    "offload.device_params": (_host_optimizer_step, KeyError, "^Parameter containing"),
    "fsdp.device_mesh": (_fsdp_wrap, TypeError, r"device\(\): argument 'index' \(position 2\) must be int"),
    "recompute.device_mode": (lambda: _recompute_replay(without_output=False), *NO_CUDA),
    "recompute_without_output.device_mode": (lambda: _recompute_replay(without_output=True), *NO_CUDA),
    # 2 gloo ranks: an overlapped pipeline send after megatron-core freed its output
    "p2p.send_holds_its_tensor": (gloo_send_after_free, AssertionError, "sent tensor arrived changed"),
}


@pytest.mark.parametrize("name", sorted(SITES))
def test_site_fails_without_its_patch(name):
    site, error, message = SITES[name]
    with cpu_compat.applied(skip=(name,)), pytest.raises(error, match=message):
        site()


@pytest.mark.parametrize("name", sorted(SITES))
def test_site_works_with_the_layer(name):
    with cpu_compat.applied():
        SITES[name][0]()


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


def test_checkpoint_writer_queue_process_dies_with_a_killed_trainer(tmp_path):
    """A trainer killed alone with SIGKILL (no process-group kill) takes its queue manager along."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "from upstream import cpu\n"
        "assert cpu.fork_checkpoint_results_queue()\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    trainer = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    manager = None
    try:
        assert trainer.stdout.readline().strip() == "ready"
        (manager,) = psutil.Process(trainer.pid).children()
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 10
        while manager.is_running() and manager.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not manager.is_running() or manager.status() == psutil.STATUS_ZOMBIE, (
            "queue manager outlived its trainer"
        )
    finally:
        trainer.kill()
        if manager is not None and manager.is_running():
            manager.kill()


def test_checkpoint_writer_queue_is_forked_and_works():
    """filesystem_async.py:54 spawns a Manager (re-importing torch, ~2 s) on a process's first save;
    on the CPU the layer puts a forked one in its place: it must pass results like the original."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved = filesystem_async._results_queue
    filesystem_async._results_queue = None
    try:
        assert cpu_compat.fork_checkpoint_results_queue() is True
        queue = filesystem_async._get_write_results_queue()
        queue.put({"rank": 0})
        assert queue.get(timeout=10) == {"rank": 0}
        assert cpu_compat.fork_checkpoint_results_queue() is False  # never replaces a live queue
        children = multiprocessing.active_children()
        assert any(type(p).__name__ == "ForkProcess" for p in children), children
    finally:
        filesystem_async._results_queue = saved
