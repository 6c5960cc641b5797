"""The CPU device layer: makes megatron-core 0.16 run on a CPU with gloo; every patch named,
narrow, and only without a GPU.

megatron-core assumes CUDA at a few kinds of sites (docs/megatron-core-on-cpu.md lists what was
measured). Each `Patch` below says which upstream sites it covers; the upstream tests show each
site failing without its patch and working with it, so a megatron-core upgrade that fixes (or
moves) a site shows up as a failing test rather than as a silent no-op.

Nothing here is ever applied on a GPU run: `enable()` refuses when the run's device is CUDA.
Bug fixes that hold on every device are upstream/fixes.py's; both are `Patch`es (upstream/patch.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from upstream import gloo_p2p, host_optimizer
from upstream.patch import Patch, PatchSet


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal to torch factories (`device=torch.cuda.current_device()`).
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to CPU inside megatron-core calls.

    Upstream sites (megatron-core 0.16.1), among others:
    - `device="cuda"` literals: pipeline_parallel/schedules.py:596,983,2138 (token counters),
      optimizer/optimizer.py:473,481,485,907 (loss-scale and overflow buffers);
    - `device=torch.cuda.current_device()`: utils.py:631 (GlobalMemoryBuffer),
      distributed/param_and_grad_buffer.py (grad buffers), optimizer/clip_grads.py (norms);
    - `Tensor.type() == 'torch.cuda.FloatTensor'` checks: optimizer/clip_grads.py:167,
      optimizer/distrib_optimizer.py:420-433, optimizer/optimizer.py (param-group sorting):
      answered with the CUDA spelling so fp32/bf16 params take their normal path;
    - `.cuda()` / `.to("cuda")` on tensors: dist_checkpointing and the optimizers;
    - `pin_memory=True` (page-locked staging for host-to-GPU copies, needs a GPU): the RoPE
      slice per context-parallel rank, models/common/embeddings/rope_utils.py:62; and
      `.pin_memory()`: the optimizer's host copies, optimizer/cpu_offloading/hybrid_optimizer.py:313.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_set_rng_state(new_state: torch.Tensor, device: object = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_get_rng_state(device: object = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


class HostEvent:
    """Stand-in for torch.cuda.Event: CPU work is already complete when recorded, so the time it was
    recorded at is when that work ended."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.recorded_at: float | None = None

    def record(self, stream: object = None) -> None:
        self.recorded_at = time.perf_counter()

    def elapsed_time(self, end: HostEvent) -> float:
        """Milliseconds from this event to `end`, as torch.cuda.Event.elapsed_time."""
        if self.recorded_at is None or end.recorded_at is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return 1000.0 * (end.recorded_at - self.recorded_at)

    def synchronize(self) -> None:
        pass

    def wait(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return True


class HostStream:
    """Stand-in for torch.cuda.Stream: the CPU has one in-order stream, so ordering is a no-op."""

    def __init__(self, *args: object, **kwargs: object):
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record_event(self, event: HostEvent | None = None) -> HostEvent:
        return event or HostEvent()

    def synchronize(self) -> None:
        pass


_HOST_STREAM = HostStream()


def _host_split_sizes(tensor: object, as_numpy: bool = False, record_stream: bool = False) -> object:
    """megatron's maybe_move_tensor_to_cpu for tensors already on the CPU.

    Upstream converts the alltoall split sizes to numpy only when `tensor.is_cuda`; CPU tensors stay
    tensors, which `all_to_all_single` rejects ("incompatible function arguments").
    """
    if as_numpy and isinstance(tensor, torch.Tensor):
        return tensor.numpy()
    return tensor


def _tensor_present(tensor: object) -> None:
    """megatron's inference `_is_cuda` check without its device half: the tensor must exist."""
    assert tensor is not None


def _uneven_all_gather(original):
    """torch.distributed.all_gather that also gathers tensors of different lengths on gloo.

    gloo requires equal sizes ("ProcessGroupGloo::allgather: invalid tensor size"); NCCL does
    not. Used by megatron's gather with output_split_sizes (tensor_parallel/mappings.py:150), which
    the MoE alltoall dispatcher calls under tensor × expert parallelism. Pads every piece to the
    longest, gathers, and copies each rank's rows out; equal sizes take the original path.
    """

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or len({tuple(t.shape) for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in tensor_list]
        original(pieces, padded, group=group)
        for out, piece in zip(tensor_list, pieces):
            out.copy_(piece[: out.shape[0]])
        return None

    return all_gather


def _in_device_mode(replay):
    """`replay` run under CudaToCpuMode: a recompute replay runs inside autograd's backward, where the
    process-wide torch function mode is not active (modes do not reach backward passes), so the
    layers' own `device="cuda"` sites would reach CUDA there."""

    def run(*args, **kwargs):
        with CudaToCpuMode():
            return replay(*args, **kwargs)

    return run


class HostDeviceMesh:
    """Stand-in for the `DeviceMesh` name megatron-core's torch FSDP wrapper uses: its meshes are
    built over the same process group, but for the CPU (gloo) instead of CUDA."""

    @staticmethod
    def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(group, "cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _patches() -> list[Patch]:
    """The attribute patches, built lazily so importing this module never imports megatron."""
    collective = _recompute_and_collective_patches()
    return [*_rng_patches(), *_device_patches(), *collective, host_optimizer.cpu_patch(), gloo_p2p.patch()]


def _rng_patches() -> list[Patch]:
    from megatron.core.tensor_parallel import random as mcore_random

    cuda = torch.cuda
    return [
        # CudaRNGStatesTracker.add/fork and model_parallel_cuda_manual_seed keep per-purpose
        # generator states (data-parallel, tensor-parallel, expert); on CPU the one CPU generator
        # plays the CUDA generator's role, so dropout inside TP regions forks from it as on GPU.
        Patch(
            "rng.get_state",
            "tensor_parallel/random.py:235,238 torch.cuda.get_rng_state",
            cuda,
            "get_rng_state",
            lambda device="cuda": torch.get_rng_state(),
        ),
        Patch(
            "rng.manual_seed",
            "tensor_parallel/random.py:237,423 torch.cuda.manual_seed",
            cuda,
            "manual_seed",
            _cpu_manual_seed,
        ),
        Patch(
            "rng.set_state",
            "tensor_parallel/random.py:72-110 _set_cuda_rng_state",
            mcore_random,
            "_set_cuda_rng_state",
            _cpu_set_rng_state,
        ),
        Patch(
            "rng.get_cuda_state",
            "tensor_parallel/random.py:41-69 _get_cuda_rng_state",
            mcore_random,
            "_get_cuda_rng_state",
            _cpu_get_rng_state,
        ),
    ]


def _device_patches() -> list[Patch]:
    from megatron.core.inference import communication_utils
    from megatron.core.transformer.moe import token_dispatcher

    cuda = torch.cuda
    return [
        # torch.cuda.current_device() raises on a CPU build; megatron uses it as the device of
        # its buffers (utils.py:631, distributed/param_and_grad_buffer.py) and inside autograd
        # backward functions, e.g. the sequence-parallel reduce-scatter buffer at
        # tensor_parallel/layers.py:551. Torch function modes do not reach custom autograd
        # backward passes, so the answer itself must be the CPU, not an ordinal for the mode.
        Patch(
            "device.current_device",
            "utils.py:631, tensor_parallel/layers.py:551 current_device",
            cuda,
            "current_device",
            lambda: _CPU,
        ),
        # Checkpoint saving waits for device-to-host copies before writing; CPU tensors need none.
        Patch(
            "device.synchronize",
            "dist_checkpointing/strategies/filesystem_async.py:230",
            cuda,
            "synchronize",
            lambda device=None: None,
        ),
        # The MoE alltoall dispatcher copies its split sizes to the host on a side stream and
        # waits on an event (transformer/moe/token_dispatcher.py:445,871-897); `torch.cuda.stream(s)`
        # itself is a no-op without CUDA and needs no patch.
        Patch(
            "stream.Stream", "transformer/moe/token_dispatcher.py:445 torch.cuda.Stream()", cuda, "Stream", HostStream
        ),
        Patch(
            "stream.current_stream",
            "transformer/moe/token_dispatcher.py:871 current_stream",
            cuda,
            "current_stream",
            lambda device=None: _HOST_STREAM,
        ),
        # The static-batch generation loop times every token with CUDA events
        # (inference/text_generation_controllers/text_generation_controller.py:1163,1337); the
        # CPU build's torch.cuda.Event is a dummy class that raises when instantiated.
        Patch(
            "stream.Event",
            "inference/text_generation_controllers/text_generation_controller.py:1163 torch.cuda.Event",
            cuda,
            "Event",
            HostEvent,
        ),
        # Generation across pipeline stages broadcasts the logits from the last stage and asserts
        # first that they are on a GPU (inference/communication_utils.py:31 `_is_cuda`, called by
        # broadcast_from_last_pipeline_stage); gloo broadcasts CPU tensors.
        Patch(
            "inference.is_cuda",
            "inference/communication_utils.py:31 assert tensor.is_cuda",
            communication_utils,
            "_is_cuda",
            _tensor_present,
        ),
        Patch(
            "moe.split_sizes",
            "transformer/moe/token_dispatcher.py:876-893 maybe_move_tensor_to_cpu",
            token_dispatcher,
            "maybe_move_tensor_to_cpu",
            _host_split_sizes,
        ),
    ]


def _recompute_and_collective_patches() -> list[Patch]:
    from megatron.core.distributed import torch_fully_sharded_data_parallel as torch_fsdp
    from megatron.core.tensor_parallel import random as mcore_random

    checkpoint, without_output = mcore_random.CheckpointFunction, mcore_random.CheckpointWithoutOutput
    return [
        # Activation recompute replays the forward inside the backward pass; a layer that places a
        # tensor on "cuda" (upstream attention's causal mask, transformer/utils.py:35) fails there.
        Patch(
            "recompute.device_mode",
            "tensor_parallel/random.py:535 CheckpointFunction.backward (full, core_attn, mlp, moe)",
            checkpoint,
            "backward",
            staticmethod(_in_device_mode(checkpoint.backward)),
        ),
        Patch(
            "recompute_without_output.device_mode",
            "tensor_parallel/random.py:664 CheckpointWithoutOutput._recompute (layernorm, moe_act)",
            without_output,
            "_recompute",
            _in_device_mode(without_output._recompute),
        ),
        # The FSDP2 wrapper builds its mesh with device type "cuda"; torch's fully_shard then asks that
        # device for its current index (torch/distributed/fsdp/_fully_shard/_fsdp_init.py:223) and
        # fails: "device(): argument 'index' (position 2) must be int, not torch.device".
        Patch(
            "fsdp.device_mesh",
            "distributed/torch_fully_sharded_data_parallel.py:81 DeviceMesh.from_group(..., 'cuda')",
            torch_fsdp,
            "DeviceMesh",
            HostDeviceMesh,
        ),
        Patch(
            "dist.uneven_all_gather",
            "tensor_parallel/mappings.py:150 all_gather with split sizes",
            torch.distributed,
            "all_gather",
            _uneven_all_gather(torch.distributed.all_gather),
        ),
    ]


class CpuCompat:
    """The applied CPU layer: attribute patches plus the device-rewriting torch function mode."""

    def __init__(self, skip: tuple = ()):
        self.patches, self.skip = PatchSet(_patches), skip  # its own Patch objects: layers nest in tests
        self.mode = None if "device.mode" in skip else CudaToCpuMode()

    def __enter__(self) -> CpuCompat:
        self.patches.apply(skip=self.skip)
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)
        self.patches.revert()


def fork_checkpoint_results_queue() -> bool:
    """On the CPU, the results queue of megatron-core's checkpoint writer comes from a forked
    multiprocessing manager instead of a spawned one.

    dist_checkpointing/strategies/filesystem_async.py:54 starts a *spawn* Manager for it on the
    first save of a process (spawn keeps CUDA state out of the child); the spawned interpreter
    re-imports torch, which takes far longer than a small checkpoint (docs/benchmarks.md). Without CUDA there is nothing to keep out, and the writer processes themselves are
    forked upstream already (filesystem_async.py:264). The manager process dies with its trainer,
    also when the trainer alone is killed with SIGKILL (the spawned one upstream was orphaned).
    Returns whether it replaced the queue.
    """
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if torch.cuda.is_available() or filesystem_async._results_queue is not None:
        return False
    manager = SyncManager(ctx=multiprocessing.get_context("fork"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    return True


def _die_with_parent(parent_pid: int) -> None:
    """In a forked helper process: SIGKILL when `parent_pid` exits (Linux; elsewhere a no-op).

    SIGKILL, not SIGTERM: the helper inherits the trainer's Python SIGTERM handler, which only
    records a preemption request.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(0)


def patch_names() -> list[str]:
    """Names of every patch, for tests and `--dry-run` reporting."""
    return [p.name for p in _patches()] + ["device.mode"]


_ACTIVE: dict[str, CpuCompat] = {}


def enable(device: torch.device) -> bool:
    """Applies the layer for the rest of the process when `device` is the CPU; a no-op on CUDA.

    Returns whether the layer is active. Idempotent.
    """
    if device.type != "cpu":
        return False
    if "process" not in _ACTIVE:
        _ACTIVE["process"] = CpuCompat().__enter__()
        fork_checkpoint_results_queue()  # before any process group: no communication threads yet
    return True


def disable() -> None:
    """Reverts what `enable` applied (for tests that start training in their own process)."""
    layer = _ACTIVE.pop("process", None)
    if layer is not None:
        layer.__exit__(None, None, None)


def applied(skip: tuple = ()) -> CpuCompat:
    """Context manager form for tests: `with applied(skip=("rng.manual_seed",)): ...`."""
    return CpuCompat(skip=skip)
