"""Pipeline outputs are freed once sent (megatron-core's `deallocate_pipeline_outputs`, on in
model/gpt.py as in Megatron-LM): on 2 gloo ranks at pipeline 2 (1F1B, the training step as
pretrain/step.py runs it) the config has it on, and the CPU allocator's peak on stage 0 is lower
than the same step with it off by one [s·b/tp, h] output per micro-batch in flight there (the
memory model counts none). On gloo an overlapped send must keep its
tensor until waited on (upstream/gloo_p2p.py): `gloo_send_after_free` is that patch's site.

Negative control (by hand, 2026-12-07): with `deallocate_pipeline_outputs=False` in
model/gpt.py:transformer_config the test fails on the flag; with megatron-core's
`deallocate_output_tensor` made to keep a reference to each output's memory before freeing it,
the step with outputs "freed" peaks no lower than the one with them kept and the drop assertion
fails (measured here: 0.5 MiB = 2 × 0.25 MiB with the fix, stage 0). With the p2p patch skipped the
site's received tensor differs from the one sent (tests/unit/test_upstream_cpu.py:
test_site_fails_without_its_patch)."""

import time

import torch
import torch.distributed as dist

from tests.helpers.spawn import run_distributed

SHAPE = [
    "model.hidden_size=256",
    "model.ffn_hidden_size=704",
    "model.seq_length=256",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "parallel.pipeline=2",
    "logging.wandb.mode=disabled",
]


def _step_peaks(rank: int, world: int) -> dict:
    """(peak − live at the start) of the same training step with the outputs freed, then kept."""
    from benchmarks.common import RandomSamples
    from parallel.layout import init_model_parallel
    from planning.setup import validate_for_world, vocab_size
    from pretrain.guards import Guards, NonfiniteGuard, StopRequest, Watchdog
    from pretrain.profiling import count_cpu_allocations_on_every_thread, cpu_allocator_peak_mib
    from pretrain.recipe import load_recipe
    from pretrain.trainer import build_stepper
    from upstream import cpu

    count_cpu_allocations_on_every_thread()
    recipe = load_recipe("tiny_gpt", SHAPE)
    device = torch.device("cpu")
    cpu.enable(device)
    layout, plan = validate_for_world(recipe, world)
    rank_info, groups = init_model_parallel(layout)
    plan = plan.for_rank(rank_info.data_rank, rank_info.context_rank, layout.context)
    vocab = vocab_size(recipe)
    stepper = build_stepper(recipe, layout, plan, groups, device, vocab)
    samples = RandomSamples(recipe.model.seq_length, vocab, recipe.train.seed)
    guards = Guards(StopRequest(), NonfiniteGuard("skip", 10), Watchdog(rank, 0.0))
    stepper.train(0, plan.step_batches(samples, 0, device), guards)  # Adam's state, allocated lazily
    batches = plan.step_batches(samples, recipe.train.global_batch_size, device)
    config = stepper.chunks[0].config
    flag = config.deallocate_pipeline_outputs
    peaks = []
    for free in (True, False):
        config.deallocate_pipeline_outputs = free
        static, peak = cpu_allocator_peak_mib(lambda: stepper.train(1, batches, guards))
        peaks.append(peak - static)
    return {"flag": torch.tensor(flag), "pipeline_rank": torch.tensor(groups.pp.rank()), "peaks": torch.tensor(peaks)}


def test_stage_0_frees_its_outputs_once_sent():
    from planning.memory import Target, estimate
    from pretrain.recipe import load_recipe

    ranks = run_distributed(_step_peaks, 2)
    assert all(bool(r["flag"]) for r in ranks)  # model/gpt.py turned it on
    recipe = load_recipe("tiny_gpt", SHAPE)
    stage0 = estimate(recipe, 2, Target.for_device("cpu", "local")).stages[0]
    assert stage0.in_flight == 2  # 1F1B: pipeline − rank micro-batches
    output_mib = 256 * 1 * 256 * 4 / 2**20  # [s·b, h] fp32
    freed, kept = ranks[0]["peaks"].tolist()
    assert abs((kept - freed) - stage0.in_flight * output_mib) <= 0.1 * output_mib, (kept, freed)
    last_freed, last_kept = ranks[1]["peaks"].tolist()
    assert last_freed == last_kept  # the last stage sends no output: the control inside the run


def _send_then_free(rank: int, world: int, patched: bool) -> torch.Tensor:
    """Rank 0 sends through megatron-core's overlapped p2p path (no wait), frees the output as
    its schedule does, and reuses the memory; rank 1 posts its receive late."""
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

    from upstream import gloo_p2p

    patch = gloo_p2p.patch()
    if patched:
        patch.apply()
    sent = torch.arange(16384, dtype=torch.float32)  # 64 KiB: below glibc's mmap threshold
    group = dist.group.WORLD
    try:
        if rank == 0:
            reqs = p2p_communication._p2p_ops(
                tensor_send_prev=None,
                tensor_recv_prev=None,
                tensor_send_next=sent,
                tensor_recv_next=None,
                group=group,
                prev_pipeline_rank=1,
                next_pipeline_rank=1,
            )
            deallocate_output_tensor(sent, True)
            reuse = [torch.full((16384,), -1.0) for _ in range(4)]
            for req in reqs.values():
                req.wait()
            del reuse
            return torch.zeros(0)
        time.sleep(0.3)  # the send cannot complete before this receive is posted
        received = torch.zeros(16384)
        dist.recv(received, 0)
        return received
    finally:
        patch.revert()


def gloo_send_after_free() -> None:
    """upstream/gloo_p2p.py's site (tests/unit/test_upstream_cpu.py: SITES): the tensor an
    overlapped send read from after megatron-core freed it. Runs patched when the calling
    process's CPU layer has the patch applied."""
    from megatron.core.pipeline_parallel import p2p_communication

    patched = p2p_communication._p2p_ops.__qualname__.startswith("_sends_hold_their_tensors")
    received = run_distributed(_send_then_free, 2, patched)[1]
    assert torch.equal(received, torch.arange(16384, dtype=torch.float32)), "sent tensor arrived changed"
