"""parallel.tp_comm_overlap's userbuffers in the memory model (planning/te_memory.py), hand-counted
from transformer-engine's initialize_ub (module/base.py) and comm_gemm_overlap.cpp: per
quantization set 12 buffers of [s·b/cp, h], the 8 all-gather ones one byte in the FP8 set; a plain
set beside the FP8 one for fp8.first_last_layers_bf16's layers (parallel/tp_overlap.py registers
both, as Megatron-LM does). Also: megatron-core's sequence-parallel all-gather buffer only where
megatron-core's own linears run on the transformer-engine path.

Negative controls (by hand, 2026-12-07): with userbuffer_bytes returning 0 every difference here is
0 and the tests fail (with StageMemory.userbuffers left 0 the reserves differ by 5 % of them); with
quantization_modes ignoring bf16 layers the FP8 count is 16 · s · h,
not 40 · s · h, and the first test fails."""

import types

import pytest

from parallel import tp_overlap
from planning.memory import Target, estimate_setup, setup_for
from planning.report import reserve_bytes
from planning.te_memory import userbuffer_bytes
from pretrain.recipe import load_recipe

LLAMA_VOCAB = 128256
S, H = 8192, 8192  # llama70b's sequence and hidden size: one buffer is S x H elements at micro-batch 1
LAYOUT = ["parallel.context=1", "parallel.pipeline=8", "parallel.tensor=4", "parallel.tp_comm_overlap=true"]


def _setup(*overrides, target=None):
    recipe = load_recipe("llama70b", [*LAYOUT, "train.global_batch_size=128", *overrides])
    return setup_for(recipe, 64, target, LLAMA_VOCAB)


@pytest.mark.parametrize(
    "overrides, elements_times_bytes",
    [
        ([], 12 * 2),  # one bf16 set
        (["fp8.enabled=true", "fp8.recipe=tensorwise"], 8 * 1 + 4 * 2),  # FP8 all-gather buffers
        (["fp8.enabled=true", "fp8.recipe=tensorwise", "fp8.first_last_layers_bf16=1"], 8 + 4 * 2 + 12 * 2),
        (["train.micro_batch_size=2", "train.global_batch_size=128"], 2 * 12 * 2),  # [s·b, h]
        (["parallel.context=2", "parallel.pipeline=4"], 12 * 2 // 2),  # [s/cp, h]
    ],
)
def test_userbuffers_per_set_and_gemm(overrides, elements_times_bytes):
    assert userbuffer_bytes(_setup(*overrides)) == S * H * elements_times_bytes


def test_only_with_the_overlap_on_transformer_engine_layers():
    assert userbuffer_bytes(_setup("parallel.tp_comm_overlap=false")) == 0
    assert userbuffer_bytes(_setup(target=Target.for_device("cpu", "transformer_engine"))) == 0


def test_every_stage_holds_them_beside_the_sequence_parallel_buffer():
    """One set per process (shared by all its layers), on every pipeline stage; megatron-core's
    sequence-parallel all-gather buffer only on the last stage on this path (the output layer is
    megatron-core's ColumnParallelLinear; TE's dense layers gather into their own tensors), on
    every stage on the local path."""
    on, off = estimate_setup(_setup()).stages, estimate_setup(_setup("parallel.tp_comm_overlap=false")).stages
    sp_buffer = S * H * 2  # [s·b, h] bf16: the whole gathered sequence
    assert [a.comm_buffers - b.comm_buffers for a, b in zip(on, off)] == [S * H * 24] * 8
    assert [s.comm_buffers for s in off] == [0] * 7 + [sp_buffer]
    # registered with the driver, not torch's caching allocator: no fragmentation share on top
    target = _setup().target
    assert [reserve_bytes(a, target) for a in on] == [reserve_bytes(b, target) for b in off]
    local = setup_for(load_recipe("tiny_gpt", ["parallel.tensor=2", "parallel.sequence_parallel=true"]), 2)
    ((stage),) = estimate_setup(local).stages
    assert stage.comm_buffers == 128 * 2 * 64 * 4  # tiny_gpt: seq 128 x micro-batch 2 x hidden 64, fp32


def test_both_sets_are_registered_for_fp8_runs_with_bf16_layers():
    """transformer-engine >= 2.7 looks each linear's communicator up by name and FP8-ness: an FP8 run
    whose first and last layers stay bf16 needs both sets. Before 2.7 (no quantization modes) one set,
    by use_fp8."""
    calls = []
    modes = types.SimpleNamespace(FP8="fp8", NONE="none")
    base = types.SimpleNamespace(UserBufferQuantizationMode=modes, initialize_ub=lambda **kw: calls.append(kw))
    te = types.SimpleNamespace(base=base)
    for fp8, bf16_layers in ((True, 1), (True, 0), (False, 0)):
        tp_overlap.initialize_userbuffers(te, [S, H], 4, fp8, "bf16", bf16_layers)
    assert [c["quantization_modes"] for c in calls] == [["fp8", "none"], ["fp8"], ["none"]]
    assert {c["bootstrap_backend"] for c in calls} == {"nccl"} and calls[0]["shape"] == [S, H]
    old = types.SimpleNamespace(base=types.SimpleNamespace(initialize_ub=lambda **kw: calls.append(kw)))
    tp_overlap.initialize_userbuffers(old, [S, H], 4, True, "bf16", 1)
    assert calls[-1]["use_fp8"] is True and "quantization_modes" not in calls[-1]
