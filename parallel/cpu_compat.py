"""Makes megatron-core 0.16 run on a CPU with gloo: every patch named, narrow, and only without a GPU.

megatron-core assumes CUDA at a few kinds of sites (see ../shared/notes/megatron-core-on-cpu.md).
Each `Patch` below says which upstream sites it covers; `tests/test_cpu_compat.py` shows each site
failing without its patch and working with it, so a megatron-core upgrade that fixes (or moves) a
site shows up as a failing test rather than as a silent no-op.

Nothing here is ever applied on a GPU run: `enable()` refuses when the run's device is CUDA.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
from typing import Dict, List

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda_device(device) -> bool:
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
      slice per context-parallel rank, models/common/embeddings/rope_utils.py:62.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


@dataclasses.dataclass
class Patch:
    """One replacement of an attribute, with the upstream site it exists for."""

    name: str
    site: str
    target: object
    attribute: str
    replacement: object
    original: object = None

    def apply(self) -> None:
        self.original = getattr(self.target, self.attribute)
        setattr(self.target, self.attribute, self.replacement)

    def revert(self) -> None:
        setattr(self.target, self.attribute, self.original)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


class HostEvent:
    """Stand-in for torch.cuda.Event: CPU work is already complete when recorded."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class HostStream:
    """Stand-in for torch.cuda.Stream: the CPU has one in-order stream, so ordering is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> HostEvent:
        return event or HostEvent()

    def synchronize(self) -> None:
        pass


_HOST_STREAM = HostStream()


def _host_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's maybe_move_tensor_to_cpu for tensors already on the CPU.

    Upstream converts the alltoall split sizes to numpy only when `tensor.is_cuda`; CPU tensors stay
    tensors, which `all_to_all_single` rejects ("incompatible function arguments").
    """
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


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


def _patches() -> List[Patch]:
    """The attribute patches, built lazily so importing this module never imports megatron."""
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    cuda = torch.cuda
    return [
        # CudaRNGStatesTracker.add/fork and model_parallel_cuda_manual_seed keep per-purpose
        # generator states (data-parallel, tensor-parallel, expert); on CPU the one CPU generator
        # plays the CUDA generator's role, so dropout inside TP regions forks from it as on GPU.
        Patch("rng.get_state", "tensor_parallel/random.py:235,238 torch.cuda.get_rng_state",
              cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        Patch("rng.manual_seed", "tensor_parallel/random.py:237,423 torch.cuda.manual_seed",
              cuda, "manual_seed", _cpu_manual_seed),
        Patch("rng.set_state", "tensor_parallel/random.py:72-110 _set_cuda_rng_state",
              mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state),
        Patch("rng.get_cuda_state", "tensor_parallel/random.py:41-69 _get_cuda_rng_state",
              mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state),
        # torch.cuda.current_device() raises on a CPU build; megatron uses it as the device of
        # its buffers (utils.py:631, distributed/param_and_grad_buffer.py) and inside autograd
        # backward functions, e.g. the sequence-parallel reduce-scatter buffer at
        # tensor_parallel/layers.py:551. Torch function modes do not reach custom autograd
        # backward passes, so the answer itself must be the CPU, not an ordinal for the mode.
        Patch("device.current_device", "utils.py:631, tensor_parallel/layers.py:551 current_device",
              cuda, "current_device", lambda: _CPU),
        # Checkpoint saving waits for device-to-host copies before writing; CPU tensors need none.
        Patch("device.synchronize", "dist_checkpointing/strategies/filesystem_async.py:230",
              cuda, "synchronize", lambda device=None: None),
        # The MoE alltoall dispatcher copies its split sizes to the host on a side stream and
        # waits on an event (transformer/moe/token_dispatcher.py:445,871-897); `torch.cuda.stream(s)`
        # itself is a no-op without CUDA and needs no patch.
        Patch("stream.Stream", "transformer/moe/token_dispatcher.py:445 torch.cuda.Stream()",
              cuda, "Stream", HostStream),
        Patch("stream.current_stream", "transformer/moe/token_dispatcher.py:871 current_stream",
              cuda, "current_stream", lambda device=None: _HOST_STREAM),
        Patch("moe.split_sizes", "transformer/moe/token_dispatcher.py:876-893 maybe_move_tensor_to_cpu",
              token_dispatcher, "maybe_move_tensor_to_cpu", _host_split_sizes),
        Patch("dist.uneven_all_gather", "tensor_parallel/mappings.py:150 all_gather with split sizes",
              torch.distributed, "all_gather", _uneven_all_gather(torch.distributed.all_gather)),
    ]


class CpuCompat:
    """The applied CPU layer: attribute patches plus the device-rewriting torch function mode."""

    def __init__(self, skip: tuple = ()):
        self.patches = [p for p in _patches() if p.name not in skip]
        self.mode = None if "device.mode" in skip else CudaToCpuMode()

    def __enter__(self) -> "CpuCompat":
        for patch in self.patches:
            patch.apply()
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)
        for patch in reversed(self.patches):
            patch.revert()


def _no_compile(model=None, **options):
    """torch.compile's call forms (`@torch.compile`, `torch.compile(fn)`, `torch.compile(**opts)`)
    returning the function unchanged."""
    return model if model is not None else (lambda fn: fn)


def import_megatron_without_jit_fusers() -> bool:
    """On a machine without CUDA, imports megatron-core with its JIT fuser off.

    megatron-core decorates its fused helpers (bias-GeLU, bias-SwiGLU, ...) with
    `megatron.core.jit.jit_fuser`, which is `torch.compile`, at import time; creating those
    wrappers imports TorchDynamo, 3.5 s of every process start on a CPU (import 4.9 s -> 1.3 s),
    for functions our configs never call (the bias/activation fusions are off). This is upstream's
    own `disable_jit_fuser()`, done before the decorators run: `torch.compile` is the identity
    while `megatron.core` is first imported, so `jit_fuser` binds to the identity for good.
    Returns whether it did so (not with CUDA, not when megatron-core is already imported).
    """
    import sys

    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        return False
    original = torch.compile
    torch.compile = _no_compile
    try:
        import megatron.core  # noqa: F401  (binds megatron.core.jit.jit_fuser)
    finally:
        torch.compile = original
    return True


def fork_checkpoint_results_queue() -> bool:
    """On the CPU, the results queue of megatron-core's checkpoint writer comes from a forked
    multiprocessing manager instead of a spawned one.

    dist_checkpointing/strategies/filesystem_async.py:54 starts a *spawn* Manager for it on the
    first save of a process (spawn keeps CUDA state out of the child); the spawned interpreter
    re-imports torch: 1.7-2.4 s on every process's first save here, the checkpoint itself taking
    0.06 s. Without CUDA there is nothing to keep out, and the writer processes themselves are
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


def fix_upstream_bugs() -> List[str]:
    """Fixes for megatron-core bugs that are not about the device; applied on CPU and GPU alike.

    - transformer/moe/moe_utils.py:1192: the MoE router's gating GEMM tests `te_general_gemm is not
      None`, but the name is bound only when transformer-engine imports, so every MoE forward
      without TE raises NameError. Binding it to None selects upstream's own torch.mm path.
    - transformer/moe/router.py:457-466,486-498 with calculate_per_token_loss (ours, always): each
      tensor×context-parallel rank attaches its *partial* load-balancing loss (its tokens' share of
      the probabilities) and its z-loss (coefficient already divided by the tp×cp size) scaled by
      its *local* token count, so the summed gradient is 1/(tp·cp) of the single-process one: TP2
      with sequence parallelism trained a different model (grad norm 3.0107 vs 3.0076 at step 2 on
      tiny_moe). Scaling by the group's token count is the same as multiplying the aux-loss scale
      by tp·cp, which is what the wrapped `MoEAuxLossAutoScaler.set_loss_scale` does.
    - optimizer/distrib_optimizer.py:940 with torch Adam (no TE/apex): a `fully_reshardable` load
      copies every key of a param's Adam state from the checkpoint, `step` included, which the
      checkpoint keeps only in the param groups (the loader skips it at :2101): `KeyError: 'step'`.
      The wrapper passes the param's own step tensor for it (a no-op copy); the step itself is
      restored from the param groups (pretrain/checkpoint.py:_restore_adam_steps).
    Returns the names of the fixes applied (empty when nothing needed fixing).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.moe import moe_utils

    applied = []
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        applied.append("moe_utils.te_general_gemm")
    scaler = moe_utils.MoEAuxLossAutoScaler
    if not getattr(scaler.set_loss_scale, "_scaled_by_tp_cp", False):
        scaler.set_loss_scale = staticmethod(_aux_loss_scale_by_tp_cp(scaler.set_loss_scale))
        applied.append("MoEAuxLossAutoScaler.set_loss_scale")
    setter = DistributedOptimizer._set_main_param_and_optimizer_states
    if not getattr(setter, "_keeps_own_step", False):
        DistributedOptimizer._set_main_param_and_optimizer_states = _keep_own_adam_step(setter)
        applied.append("DistributedOptimizer._set_main_param_and_optimizer_states")
    return applied


def _keep_own_adam_step(original):
    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            own = self.optimizer.state[main_param].get("step")
            if own is not None:
                tensors = {**tensors, "step": own}
        return original(self, model_param, tensors)

    set_states._keeps_own_step = True
    return set_states


def _aux_loss_scale_by_tp_cp(original):
    def set_loss_scale(scale: torch.Tensor) -> None:
        from megatron.core import parallel_state as ps

        original(scale * ps.get_tensor_and_context_parallel_world_size())

    set_loss_scale._scaled_by_tp_cp = True
    return set_loss_scale


def patch_names() -> List[str]:
    """Names of every patch, for tests and `--dry-run` reporting."""
    return [p.name for p in _patches()] + ["device.mode"]


_ACTIVE: Dict[str, CpuCompat] = {}


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


def applied(skip: tuple = ()) -> CpuCompat:
    """Context manager form for tests: `with applied(skip=("rng.manual_seed",)): ...`."""
    return CpuCompat(skip=skip)
