"""The training loop: builds a run from its recipe (layout, model, data, optimizer, step,
checkpointer, metrics), then steps it to `train.steps`. Each component decides its own details
and cadence; this module only wires them and loops."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import torch

from data.loader import BatchPlan, TrainBatches
from parallel import tp_overlap
from parallel.layout import (
    Layout,
    RankInfo,
    init_model_parallel,
    init_process_group,
    node_size_from_env,
    pick_device,
    world_from_env,
)
from planning.flops import attention_flops_per_pair
from planning.gpus import device_peak_tflops
from planning.setup import validate_for_world
from pretrain.checkpoint.checkpointer import Checkpointer, TrainState
from pretrain.faults import FaultInjection, check_debug_for_world
from pretrain.guards import Guards, Interrupted, NonfiniteGuard, NonfiniteStop, Preempted, StopRequest, Watchdog
from pretrain.metrics import Metrics, MetricsLog, flops_per_token
from pretrain.oom import OutOfMemoryInStep
from pretrain.profiling import Profiler
from pretrain.recipe import Recipe, check_output_dirs, recipe_to_dict, write_recipe
from pretrain.step import Evaluation, Stepper
from upstream import cpu


@dataclasses.dataclass
class Run:
    """Everything one training process holds; built once by `build_run`."""

    recipe: Recipe
    layout: Layout
    rank: RankInfo
    device: torch.device
    vocab_size: int
    samples: dict[str, Any]  # split name -> data.dataset.BlendedSamples ('train'; 'valid', 'test' when asked for)
    stepper: Stepper
    evaluation: Evaluation
    checkpointer: Checkpointer
    state: TrainState = dataclasses.field(default_factory=TrainState)


def build_runtime(recipe: Recipe) -> tuple[Layout, BatchPlan, RankInfo, Any, torch.device]:
    """This process's device, process groups and share of each batch; the CPU layer when on a CPU."""
    rank, local_rank, world_size = world_from_env()
    layout, plan = validate_for_world(recipe, world_size, node_size_from_env())
    check_debug_for_world(recipe.debug, world_size)
    device = pick_device(recipe.train.device, local_rank)
    if recipe.fp8.enabled:  # transformer-engine and its version, the device's FP8 GEMMs: before any work
        from model.fp8.linear import check_runtime

        check_runtime(recipe.fp8, recipe.model, device)
    te_module = tp_overlap.check_runtime(device) if recipe.parallel.tp_comm_overlap else None
    cpu.enable(device)
    init_process_group(device, rank, world_size)
    rank_info, groups = init_model_parallel(layout)
    if te_module is not None:  # userbuffers before the model: its linears look them up by name
        m = recipe.model
        shape = tp_overlap.userbuffer_shape(m.seq_length, recipe.train.micro_batch_size, layout.context, m.hidden_size)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision, torch.float32)
        fp8 = recipe.fp8
        tp_overlap.initialize_userbuffers(
            te_module, shape, layout.tensor, fp8.enabled, dtype, fp8.first_last_layers_bf16
        )
    plan = plan.for_rank(rank_info.data_rank, rank_info.context_rank, layout.context)
    return layout, plan, rank_info, groups, device


def build_data(recipe: Recipe, tokenizer: Any) -> dict[str, Any]:
    """Train (valid, test) samples of data.path / data.blend; every rank calls this at once."""
    from data import dataset

    cache_dir = str(recipe.data.cache_dir or recipe.log_dir() / "data_cache")
    t = recipe.train
    return dataset.build_data(recipe.data, recipe.model.seq_length, t.seed, tokenizer, cache_dir, t.test_at_end)


def build_stepper(
    recipe: Recipe, layout: Layout, plan: BatchPlan, groups: Any, device: torch.device, vocab_size: int
) -> Stepper:
    """The model (wrapped for data parallelism), its optimizer and LR schedule, wired into a Stepper."""
    from model.gpt import ModelBuild, build_model
    from model.precision import Precision
    from pretrain.optim import Numerics, build_optimizer, build_scheduler

    t = recipe.train
    precision = Precision(t.precision)  # its dtype and flags, for the model, the optimizer and the step
    build = ModelBuild(
        layout=layout,
        precision=precision,
        init_seed=t.seed,
        # megatron-core overlaps p2p only unbatched; gloo needs unbatched anyway (model/gpt.py)
        batch_p2p_comm=device.type == "cuda" and not recipe.parallel.p2p_overlapped,
        overlap_p2p_comm=recipe.parallel.p2p_overlapped,
        compile=tuple(t.compile),
        fp8=recipe.fp8,
        document_positions=recipe.data.reset_position_ids,
    )
    chunks = build_model(recipe.model, build, vocab_size, device, groups)
    te_fp8 = recipe.fp8.enabled and recipe.model.transformer_impl == "transformer_engine"
    chunks = recipe.parallel.build_data_parallel(chunks, groups, fp8_param_gather=te_fp8 and recipe.fp8.params)
    tokens = t.micro_batch_size * recipe.model.seq_length
    numerics = Numerics(precision, t.grad_clip, tokens, recipe.fp8.recipe if te_fp8 else None)
    optimizer = build_optimizer(
        recipe.optimizer,
        numerics,
        chunks,
        recipe.parallel.distributed_optimizer,
        fp32_params=recipe.parallel.fsdp is not None,
        groups=groups,
    )
    moe = None
    if recipe.model.moe.num_experts is not None:
        from model.moe import MoeMonitor

        moe = MoeMonitor(recipe.model, chunks)
    return Stepper(
        chunks=chunks,
        optimizer=optimizer,
        scheduler=build_scheduler(recipe.optimizer, t.steps, optimizer),
        plan=plan,
        seq_length=recipe.model.seq_length,
        seed=t.seed,
        precision=precision,
        faults=FaultInjection(recipe.debug, torch.distributed.get_rank()),
        device=device,
        groups=groups,
        vocab_size=vocab_size,
        moe=moe,
    )


def build_run(recipe: Recipe) -> Run:
    from data.tokenizer import build_tokenizer

    layout, plan, rank, groups, device = build_runtime(recipe)
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    vocab_size = recipe.model.vocab_size or tokenizer.vocab_size
    samples = build_data(recipe, tokenizer)
    stepper = build_stepper(recipe, layout, plan, groups, device, vocab_size)
    checkpointer = Checkpointer(
        recipe.checkpoint,
        recipe.checkpoint_dir(),
        stepper.chunks,
        stepper.optimizer,
        stepper.scheduler,
        extra={"recipe": recipe_to_dict(recipe), "vocab_size": vocab_size},  # unpadded: what an export keeps
        rank=rank.rank,
        faults=stepper.faults,
    )
    t = recipe.train
    evaluation = Evaluation(stepper, samples, t.eval_interval, t.eval_steps, t.test_at_end)
    return Run(
        recipe=recipe,
        layout=layout,
        rank=rank,
        device=device,
        vocab_size=vocab_size,
        samples=samples,
        stepper=stepper,
        evaluation=evaluation,
        checkpointer=checkpointer,
    )


def build_metrics(run: Run) -> Metrics:
    """Rank 0 writes metrics.jsonl and wandb (from the resumed step on); every rank builds records.
    An FP8 run says so first, then which GEMMs run in FP8 (gathered from every rank's model)."""
    recipe, plan = run.recipe, run.stepper.plan
    device_name = torch.cuda.get_device_name() if run.device.type == "cuda" else None
    peak, fp8_peak = device_peak_tflops(device_name), device_peak_tflops(device_name, fp8=True)
    fp8_lines = _fp8_lines(run, peak, fp8_peak) if recipe.fp8.enabled else []
    log = None
    if run.rank.rank == 0:
        log = MetricsLog(recipe.log_dir(), run.state.step, recipe_to_dict(recipe), recipe.logging)
        lines = [
            f"layout: {run.layout.describe()}; {plan.micro_batches} micro-batches/step",
            f"communication overlap: {recipe.parallel.overlap_description()}",
            _optimizer_line(run),
        ]
        print("\n".join(fp8_lines[:1] + lines + fp8_lines[1:]), flush=True)
    return Metrics(
        recipe.logging,
        log,
        recipe.train.global_batch_size * recipe.model.seq_length,
        recipe.model.seq_length,
        flops_per_token(recipe.model, run.vocab_size),
        peak,
        run.layout.world_size,
        plan.micro_batches,
        run.layout.pipeline_bubble(plan.micro_batches),
        fp8_peak_tflops=fp8_peak if recipe.fp8.enabled else None,
        pair_flops=attention_flops_per_pair(recipe.model),
    )


def _optimizer_line(run: Run) -> str:
    """Which parameters each optimizer steps (rank 0's pipeline stage)."""
    cfg = run.recipe.optimizer
    if cfg.name == "adamw" and cfg.cpu_offload:
        from pretrain.optim import host_share

        host, total = host_share(run.stepper.optimizer)
        return f"optimizer: AdamW for every parameter; {host} of {total} elements stepped on the host (cpu_offload)"
    if cfg.name == "adamw":
        return "optimizer: AdamW for every parameter"
    from pretrain.muon import describe

    return describe(run.stepper.chunks, cfg.split_qkv)


def _fp8_lines(run: Run, peak: float | None, fp8_peak: float | None) -> list[str]:
    """What an FP8 run logs before its first step; every rank takes part (its linears are gathered)."""
    import torch.distributed as dist

    from model.fp8.linear import describe, linear_places, summarize

    lines = [describe(run.recipe.fp8, run.recipe.model)]
    if run.recipe.model.transformer_impl == "local":
        places: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(places, linear_places(run.stepper.chunks))
        lines.append(summarize(set().union(*(p[0] for p in places)), set().union(*(p[1] for p in places))))
    if peak is not None:
        fp8 = f"mfu_fp8 against the FP8 peak ({fp8_peak:.0f} TFLOP/s)" if fp8_peak else "no FP8 peak known"
        lines.append(f"mfu counts against the bf16 peak ({peak:.0f} TFLOP/s), {fp8}")
    return lines


def build_watchdog(run: Run) -> Watchdog:
    """The stall watchdog; with it on, the record of every collective and the hang report, which the
    ranks exchange through the c10d store (pretrain/forensics.py)."""
    timeout_s = run.recipe.train.watchdog_timeout_s
    if not timeout_s > 0:
        return Watchdog(run.rank.rank, 0.0)
    from pretrain.faults import hang_before_collective
    from pretrain.forensics import CollectiveRing, HangReport

    ring = CollectiveRing(run.rank.rank)
    ring.before_entering = hang_before_collective(run.recipe.debug, run.rank.rank, ring)
    report = HangReport(ring, run.layout.world_size, run.recipe.log_dir() / "watchdog", collect_s=min(timeout_s, 5.0))
    return Watchdog(run.rank.rank, timeout_s, report=report)


def train(recipe: Recipe) -> dict[str, Any]:
    """Trains `recipe` to `train.steps`; returns the last metrics record (on every rank), or only
    {"step": N} when the checkpoint was already at train.steps or beyond.

    Raises Preempted after the checkpoint when a preemption signal arrived (SIGTERM, SIGUSR1),
    Interrupted likewise after Ctrl-C (SIGINT; a second one ends the process at once), and
    NonfiniteStop when the non-finite guard ends the run; every rank raises at the same step."""
    check_output_dirs(recipe)
    with StopRequest(rank=int(os.environ.get("RANK", "0"))).installed() as stop:
        run = build_run(recipe)
        run.checkpointer.resume(run.state, recipe.train.global_batch_size)
        if run.rank.rank == 0:
            write_recipe(recipe, recipe.log_dir() / "recipe.yaml")
        batches = TrainBatches(
            run.samples["train"],
            run.stepper.plan,
            run.state.consumed_samples,
            recipe.train.steps - run.state.step,
            recipe.data.num_workers,
            run.device,
        )
        guard = NonfiniteGuard(recipe.train.on_nonfinite, recipe.train.max_skipped_steps, run.state.nonfinite_steps)
        metrics = build_metrics(run)
        profiler = Profiler(recipe.train.profile, run.rank.rank, recipe.log_dir(), run.device)
        try:
            with build_watchdog(run) as watchdog:
                return _loop(run, batches, metrics, profiler, Guards(stop, guard, watchdog))
        except (OutOfMemoryInStep, torch.OutOfMemoryError) as e:
            from pretrain.oom import OutOfMemory, report

            if isinstance(e, torch.OutOfMemoryError):  # outside Stepper.train: around the last step counted
                e = OutOfMemoryInStep(run.state.step, "data, evaluation, logging or checkpoint", str(e), run.device)
            raise OutOfMemory(
                report(recipe, run.layout.world_size, run.rank.rank, run.device, run.vocab_size, e)
            ) from None
        finally:
            profiler.close()
            batches.close()
            metrics.close()


def _loop(run: Run, batches: TrainBatches, metrics: Metrics, profiler: Profiler, guards: Guards) -> dict[str, Any]:
    recipe, state = run.recipe, run.state
    record: dict[str, Any] = {"step": state.step}
    start_step = state.step
    while state.step < recipe.train.steps:
        profiler.before_step(state.step + 1)
        guards.stop.step = state.step + 1
        start = time.perf_counter()
        with guards.watchdog.phase(state.step + 1, "data"):
            step_batches = batches.step(state.consumed_samples)
            run.stepper.check_token_ids(step_batches, run.samples["train"], state.consumed_samples)
        result = run.stepper.train(state.step, step_batches, guards)
        state.consumed_samples += recipe.train.global_batch_size  # a skipped step uses up its batch too
        state.step += 1
        stop_reason = _count_nonfinite(run, guards.nonfinite, result.nonfinite, result.loss)
        record = metrics.record(
            state.step, state.consumed_samples, state.nonfinite_steps, result, time.perf_counter() - start
        )
        last = state.step == recipe.train.steps
        record.update(run.evaluation.after(state.step, last, guards.watchdog))
        with guards.watchdog.phase(state.step, "logging"):
            metrics.after_step(record, result, last, evaluated="val_loss" in record)
        if stop_reason:
            run.checkpointer.finish()
            raise NonfiniteStop(stop_reason)
        run.checkpointer.after_step(state, guards.watchdog)
        profiler.after_step(state.step)
        if result.stop:
            where = run.checkpointer.before_preemption_stop(state, guards.watchdog)
            stop = Interrupted if result.interrupted else Preempted
            what = "Ctrl-C" if result.interrupted else "preemption signal"
            raise stop(
                f"{what}: stopped after step {state.step}, {where}; "
                f"resume with checkpoint.load=auto (exit code {stop.exit_code})"
            )
    run.checkpointer.at_end(state, trained=state.step > start_step, watchdog=guards.watchdog)
    return record


def _count_nonfinite(run: Run, guard: NonfiniteGuard, nonfinite: bool, loss: float) -> str | None:
    """Counts a non-finite step (warning on rank 0); returns why the run must stop, or None."""
    if not nonfinite:
        return None
    reason = guard.count(run.state.step, loss)
    run.state.nonfinite_steps = guard.skipped
    if reason is None and run.rank.rank == 0:
        print(guard.warning(run.state.step, loss), file=sys.stderr, flush=True)
    return reason
