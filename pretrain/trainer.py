"""The training loop: wires recipe, layout, model, data, optimizer, checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist

from parallel import cpu_compat
from parallel.layout import (
    Layout,
    RankInfo,
    init_model_parallel,
    init_process_group,
    pick_device,
    world_from_env,
)
from pretrain import checkpoint
from pretrain.config import DebugConfig, Recipe, recipe_to_dict, validate_for_world
from pretrain.guards import (
    Guards, NonfiniteGuard, NonfiniteStop, Preempted, StopRequest, Watchdog, agree, grads_are_finite,
)
from pretrain.metrics import MetricsLog, device_peak_tflops, flops_per_token


@dataclasses.dataclass
class Run:
    """Everything one training process holds; built once by `build_run`."""

    recipe: Recipe
    layout: Layout
    rank: RankInfo
    device: torch.device
    chunks: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    data: dict  # split name -> data.dataset.BlendedSamples ('train', and 'valid' when configured)
    vocab_size: int
    log_dir: pathlib.Path
    ckpt_dir: pathlib.Path
    moe: Optional[object] = None  # model.moe.MoeMonitor when the model has experts
    async_saves: Optional[object] = None  # background checkpoint writes (checkpoint.async_save)
    step: int = 0
    nonfinite_steps: int = 0  # steps skipped by the non-finite guard, resumes included
    consumed_samples: int = 0  # training samples read so far: the next step starts at this global index
    loader: Optional[object] = None  # data.loader.PrefetchingLoader when data.num_workers > 0


def log_dir_of(recipe: Recipe) -> pathlib.Path:
    return pathlib.Path(recipe.logging.dir or f"runs/{recipe.logging.name}")


def ckpt_dir_of(recipe: Recipe) -> pathlib.Path:
    return pathlib.Path(recipe.checkpoint.dir or log_dir_of(recipe) / "checkpoints")


def build_runtime(recipe: Recipe):
    """Process group, device, CPU layer and megatron-core groups for this process."""
    rank, local_rank, world_size = world_from_env()
    validate_for_world(recipe, world_size)
    device = pick_device(recipe.train.device, local_rank)
    cpu_compat.enable(device)
    cpu_compat.fix_upstream_bugs()
    init_process_group(device, rank, world_size)
    layout = Layout.from_config(recipe.parallel, world_size)
    return layout, init_model_parallel(layout), device


def build_model(recipe: Recipe, layout: Layout, device: torch.device, vocab_size: int):
    """GPTModel chunks on `device`, in the training precision, wrapped in megatron-core DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from model.gpt import ModelBuild, build_model_chunks

    torch.manual_seed(recipe.train.seed)
    model_parallel_cuda_manual_seed(recipe.train.seed)
    build = ModelBuild(
        tensor=layout.tensor, pipeline=layout.pipeline, virtual_pipeline=layout.virtual_pipeline,
        context=layout.context, context_comm=recipe.parallel.context_comm, expert=layout.expert,
        expert_tensor=layout.expert_tensor, sequence_parallel=layout.sequence_parallel,
        first_stage_layers=recipe.parallel.first_stage_layers,
        last_stage_layers=recipe.parallel.last_stage_layers,
        precision=recipe.train.precision, init_seed=recipe.train.seed,
        batch_p2p_comm=device.type == "cuda",
    )
    chunks = [c.to(device) for c in build_model_chunks(recipe.model, build, vocab_size)]
    if recipe.train.precision != "fp32":
        chunks = [Float16Module(c.config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]


def build_optimizer(recipe: Recipe, chunks):
    """megatron-core's (distributed) Adam with Megatron's LR schedule, stepped once per step."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt, train = recipe.optimizer, recipe.train
    config = OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_eps=opt.eps,
        clip_grad=train.grad_clip, bf16=train.precision == "bf16", fp16=train.precision == "fp16",
        params_dtype=chunks[0].config.params_dtype,
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
        initial_loss_scale=_initial_loss_scale(recipe),
    )
    optimizer = get_megatron_optimizer(config, chunks)
    scheduler = build_scheduler(recipe, optimizer)
    return optimizer, scheduler


_DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "wsd": "WSD", "constant": "constant"}


def build_scheduler(recipe: Recipe, optimizer):
    """Megatron's OptimizerParamScheduler in optimizer steps; the recipe's schedule wins on resume."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt, train = recipe.optimizer, recipe.train
    decay_steps = opt.decay_steps or max(train.steps - opt.warmup_steps, 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps, lr_decay_steps=opt.warmup_steps + decay_steps,
        lr_decay_style=_DECAY_STYLES[opt.decay],
        start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=max(train.steps, 1), wd_incr_style="constant",
        wsd_decay_steps=opt.wsd_decay_steps or max(decay_steps // 10, 1),
        lr_wsd_decay_style="linear",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )


def _initial_loss_scale(recipe: Recipe) -> float:
    """fp16 only: the backpropagated loss is a token *sum* (per-token loss, normalized after the
    all-reduce), so start the dynamic scale where 2^16 / tokens-per-micro-batch keeps it in fp16
    range, instead of megatron-core's 2^32, which skips the first ~40 steps while it backs off."""
    tokens = recipe.train.micro_batch_size * recipe.model.seq_length
    return float(2 ** max(int(math.log2(2**16 / tokens)), 0))


def wire_schedule(chunks, optimizer) -> None:
    """The hooks megatron-core's schedules call: grad sync control and grad finalization."""
    from megatron.core.distributed import finalize_model_grads

    config = chunks[0].config
    no_sync = [c.no_sync for c in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


def build_data(recipe: Recipe, tokenizer, log_dir: pathlib.Path) -> dict:
    """Train (valid, test) samples of data.path / data.blend; every rank calls this at once."""
    from data.dataset import blend_of, build_samples
    from pretrain.errors import UserError

    data = recipe.data
    train_blend = blend_of(data.path, data.blend)
    if not train_blend:
        raise UserError("no training data: set data.path to an indexed dataset prefix, or data.blend")
    return build_samples(
        train_blend, blend_of(data.valid_path, data.valid_blend), data.split,
        seq_length=recipe.model.seq_length, seed=recipe.train.seed, eod=tokenizer.eod,
        eod_mask_loss=data.eod_mask_loss, cache_dir=str(data.cache_dir or log_dir / "data_cache"),
        vocab_size=tokenizer.vocab_size, with_test=recipe.train.test_at_end,
    )


def build_run(recipe: Recipe) -> Run:
    from data.tokenizer import build_tokenizer

    layout, rank, device = build_runtime(recipe)
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    vocab_size = recipe.model.vocab_size or tokenizer.vocab_size
    data = build_data(recipe, tokenizer, log_dir_of(recipe))
    chunks = build_model(recipe, layout, device, vocab_size)
    optimizer, scheduler = build_optimizer(recipe, chunks)
    wire_schedule(chunks, optimizer)
    moe = None
    if recipe.model.moe.num_experts is not None:
        from model.moe import MoeMonitor

        moe = MoeMonitor(recipe.model, chunks)
    return Run(
        recipe=recipe, layout=layout, rank=rank, device=device, chunks=chunks,
        optimizer=optimizer, scheduler=scheduler, data=data, vocab_size=vocab_size,
        log_dir=log_dir_of(recipe), ckpt_dir=ckpt_dir_of(recipe), moe=moe,
    )


def rank_share(run: Run):
    """Which part of each global batch this rank reads (data-parallel share, context-parallel slice)."""
    from data.loader import RankShare

    train = run.recipe.train
    return RankShare(run.rank.data_rank, run.layout.data, run.rank.context_rank, run.layout.context,
                     train.micro_batch_size, train.global_batch_size)


def micro_batches(run: Run, samples, first: int) -> List[dict]:
    """This rank's micro-batches of the global batch starting at sample `first`, on the run's device."""
    share = rank_share(run)
    return [{k: v.to(run.device) for k, v in share.batch(samples, first, m).items()}
            for m in range(share.micro_batches)]


def train_loader(run: Run):
    """data.num_workers > 0: a loader whose workers read ahead from the next step to train; else None."""
    from data.loader import PrefetchingLoader

    workers = run.recipe.data.num_workers
    if not workers:
        return None
    return PrefetchingLoader(run.data["train"], rank_share(run), run.consumed_samples,
                             run.recipe.train.steps - run.step, workers, run.device)


def train_batches(run: Run) -> List[dict]:
    """This rank's micro-batches of the next training step (from the loader's workers when there are)."""
    if run.loader is not None:
        return run.loader.step_batches(run.consumed_samples)
    return micro_batches(run, run.data["train"], run.consumed_samples)


def num_micro_batches(run: Run) -> int:
    return rank_share(run).micro_batches


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses; megatron-core divides by the global token count."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


def seed_step(seed: int, step: int) -> None:
    """Reseeds every random stream (dropout: data-parallel, tensor-parallel and expert trackers)
    from (train.seed, step) before step `step`, so random draws are a function of the step alone:
    a resumed run draws exactly what the uninterrupted one did, and checkpoints need no RNG state."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.layers import derive_seed

    step_seed = derive_seed(seed, step + 1) % (2**31)  # megatron adds offsets: keep it in int32 range
    torch.manual_seed(step_seed)
    model_parallel_cuda_manual_seed(step_seed)


def _forward_step_with_nan_loss(data_iterator, model):
    """debug.nan_loss_at_step: the usual forward step, its loss multiplied by NaN."""
    output, loss_func = _forward_step(data_iterator, model)
    return output, partial(_nan_loss, loss_func)


def _nan_loss(loss_func, output_tensor: torch.Tensor):
    loss_sum, num_tokens, reports = loss_func(output_tensor)
    nan_sum = torch.tensor([float("nan"), 1.0], device=loss_sum.device)  # [loss sum, token count]
    return loss_sum * float("nan"), num_tokens, {k: v * nan_sum for k, v in reports.items()}


def _forward_backward(run: Run, batches: List[dict], forward_only: bool, step: Optional[int] = None) -> list:
    """megatron-core's schedule for this layout over this rank's micro-batches of one global batch;
    `step` (0-based; training only) is where the `debug` section's fault injections apply."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    debug: DebugConfig = run.recipe.debug
    if step is not None and debug.stall_at_step == step + 1:
        time.sleep(debug.stall_s)
    poisoned = step is not None and debug.nan_loss_at_step == step + 1
    iterators = [iter(batches) for _ in run.chunks]  # every model chunk reads the same micro-batches
    return get_forward_backward_func()(
        forward_step_func=_forward_step_with_nan_loss if poisoned else _forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=run.chunks if len(run.chunks) > 1 else run.chunks[0],
        num_microbatches=num_micro_batches(run),
        seq_length=run.recipe.model.seq_length,
        micro_batch_size=run.recipe.train.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(run: Run, step: int, guards: Guards) -> dict:
    """One optimizer step over the global batch; returns loss, grad norm, lr, and what every rank
    agreed on: `nonfinite` (the update was not applied) and `stop` (a preemption signal arrived)."""
    seed_step(run.recipe.train.seed, step)
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    run.scheduler.step(increment=1)  # step k (1-based) trains with lr(k): warmup starts above 0
    with guards.watchdog.phase(step + 1, "forward_backward"):
        losses = _forward_backward(run, train_batches(run), forward_only=False, step=step)
        run.consumed_samples += run.recipe.train.global_batch_size  # a skipped step uses up its batch too
    with guards.watchdog.phase(step + 1, "optimizer"):
        loss = _global_mean_loss(run, losses)
        # fp16 gradients overflow by design while the loss scale adjusts: megatron-core's optimizer
        # finds those itself (and skips the update), so only the loss is ours to check there.
        check_grads = run.recipe.train.precision != "fp16"
        bad = not math.isfinite(loss) or (check_grads and not grads_are_finite(run.chunks))
        nonfinite, stop = agree([bad, guards.stop.requested], run.device)
        updated, grad_norm = False, None
        if not nonfinite:
            updated, grad_norm, _ = run.optimizer.step()
    out = {
        "loss": loss,
        "skipped": not updated,  # non-finite, or fp16 overflow (megatron-core lowers the scale)
        "nonfinite": nonfinite,
        "stop": stop,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    if run.moe is not None:
        out["moe"] = run.moe.step_metrics(
            run.device, num_micro_batches(run), run.layout.data,
            run.layout.world_size // run.layout.pipeline)
    return out


@torch.no_grad()
def evaluate(run: Run, split: str = "valid") -> dict:
    """Token-mean loss over the first train.eval_steps global batches of the `split` samples ('valid'
    or 'test'), forward only (every layout, pipeline included); the same samples at every evaluation.
    Returns {val_loss, val_ppl} or {test_loss, test_ppl}."""
    gbs = run.recipe.train.global_batch_size
    for chunk in run.chunks:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(run.recipe.train.eval_steps):
        batches = micro_batches(run, run.data[split], k * gbs)
        total += _loss_sums(run, _forward_backward(run, batches, forward_only=True))
    for chunk in run.chunks:
        chunk.train()
    loss = float(total[0] / total[1])
    prefix = {"valid": "val", "test": "test"}[split]
    return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 700.0))}


def _global_mean_loss(run: Run, losses: list) -> float:
    """Token-mean LM loss over the global batch, made known to every rank."""
    total = _loss_sums(run, losses)
    return float(total[0] / total[1])


def _loss_sums(run: Run, losses: list) -> torch.Tensor:
    """[loss sum, token count] over the global batch (float64, CPU), made known to every rank."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            total += item["lm loss"].detach().to("cpu", torch.float64)
        dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(total, group=dp_group)
    total = total.to(run.device)
    dist.broadcast(total, src=dist.get_world_size() - 1)
    return total.cpu()


def _extra_state(run: Run) -> dict:
    return {
        "step": run.step,
        "consumed_samples": run.consumed_samples,
        "scheduler": run.scheduler.state_dict(),
        "nonfinite_steps": run.nonfinite_steps,
        "recipe": recipe_to_dict(run.recipe),
        "vocab_size": run.vocab_size,  # unpadded: what an export to Hugging Face keeps
    }


def save_checkpoint(run: Run) -> int:
    """Saves the run at its current step; returns that step."""
    cfg = run.recipe.checkpoint
    if cfg.async_save and run.async_saves is None:
        run.async_saves = checkpoint.new_async_queue()
    path = checkpoint.save(run.ckpt_dir, run.step, run.chunks, run.optimizer, _extra_state(run),
                           optimizer_format=cfg.optimizer_format, keep_last=cfg.keep_last,
                           async_queue=run.async_saves)
    if run.rank.rank == 0:
        background = " (writing in the background)" if cfg.async_save else ""
        print(f"saved checkpoint {path}{background}", flush=True)
    return run.step


def finish_saves(run: Run, blocking: bool) -> None:
    """Publishes finished background saves (all of them when `blocking`); collective, cheap."""
    checkpoint.finish_async_saves(run.async_saves, blocking=blocking)


def maybe_resume(run: Run) -> None:
    path = checkpoint.resolve_load(run.recipe.checkpoint.load, run.ckpt_dir)
    if path is None:
        checkpoint.refuse_to_overwrite(run.recipe.checkpoint.load, run.ckpt_dir)
        return
    extra = checkpoint.load(path, run.chunks, run.optimizer)
    if extra.get("kind") == "weights":  # e.g. converted from Hugging Face: a fresh run from these weights
        checkpoint.refuse_to_overwrite(None, run.ckpt_dir)
        if run.rank.rank == 0:
            print(f"loaded weights from {path}; training starts at step 0", flush=True)
        return
    run.scheduler.load_state_dict(extra["scheduler"])
    run.step = int(extra["step"])
    run.nonfinite_steps = int(extra.get("nonfinite_steps", 0))  # absent before the fault guards
    # Samples are addressed by global index: resuming at any data-parallel size continues at the
    # first sample the interrupted run had not trained on.
    run.consumed_samples = int(extra.get("consumed_samples", run.step * run.recipe.train.global_batch_size))
    if run.rank.rank == 0:
        print(f"resumed from {path} at step {run.step}", flush=True)


def pipeline_bubble(layout: Layout, micro_batches: int) -> float:
    """Idle fraction of a step in megatron-core's (interleaved) 1F1B schedule:
    (pp − 1) / (vpp · m + pp − 1) for pp stages, vpp chunks each, m micro-batches, equal-time stages."""
    pp, vpp = layout.pipeline, layout.model_chunks
    return (pp - 1) / (vpp * micro_batches + pp - 1)


def _metrics_record(run: Run, out: dict, step_time: float, tokens_per_step: int, fpt: float,
                    peak: Optional[float]) -> dict:
    tokens_per_s = tokens_per_step / step_time
    record = {
        "step": run.step,
        "loss": out["loss"],
        "lr": out["lr"],
        "grad_norm": out["grad_norm"],
        "consumed_tokens": run.consumed_samples * run.recipe.model.seq_length,
        "tokens_per_s": tokens_per_s,
        "step_time_s": step_time,
        "micro_batches": num_micro_batches(run),
        "nonfinite_steps": run.nonfinite_steps,
        "pipeline_bubble": pipeline_bubble(run.layout, num_micro_batches(run)),
    }
    if out["skipped"]:
        record["skipped"] = True
    record.update(out.get("moe", {}))
    if peak is not None:
        tflops = fpt * tokens_per_s / run.layout.world_size / 1e12
        record["tflops_per_device"] = tflops
        record["mfu"] = tflops / peak
    return record


def train(recipe: Recipe) -> dict:
    """Trains `recipe` to `train.steps`; returns the last metrics record (on every rank).

    Raises Preempted after the checkpoint when a preemption signal arrived (SIGTERM, SIGUSR1), and
    NonfiniteStop when the non-finite guard ends the run; every rank raises at the same step."""
    with StopRequest().installed() as stop:
        run = build_run(recipe)
        maybe_resume(run)
        run.loader = train_loader(run)
        guard = NonfiniteGuard(recipe.train.on_nonfinite, recipe.train.max_skipped_steps, run.nonfinite_steps)
        log = None
        if run.rank.rank == 0:
            log = MetricsLog(run.log_dir, run.step, recipe_to_dict(recipe), recipe.logging)
            print(f"layout: {run.layout.describe()}; {num_micro_batches(run)} micro-batches/step", flush=True)
        try:
            with Watchdog(run.rank.rank, recipe.train.watchdog_timeout_s) as watchdog:
                return _train_loop(run, Guards(stop, guard, watchdog), log)
        finally:
            if run.loader is not None:
                run.loader.close()
            if log is not None:
                log.close()


def _train_loop(run: Run, guards: Guards, log: Optional[MetricsLog]) -> dict:
    recipe = run.recipe
    tokens_per_step = recipe.train.global_batch_size * recipe.model.seq_length
    fpt = flops_per_token(recipe.model, run.vocab_size)
    peak = device_peak_tflops(torch.cuda.get_device_name() if run.device.type == "cuda" else None)
    record, start_step, saved_at = {}, run.step, None
    while run.step < recipe.train.steps:
        start = time.perf_counter()
        out = train_step(run, run.step, guards)
        run.step += 1
        stop_reason = _count_nonfinite(run, guards.nonfinite, out)
        record = _metrics_record(run, out, time.perf_counter() - start, tokens_per_step, fpt, peak)
        last = run.step == recipe.train.steps
        evaluated = bool(recipe.train.eval_interval) and (run.step % recipe.train.eval_interval == 0 or last)
        if evaluated:
            with guards.watchdog.phase(run.step, "evaluation"):
                record.update(evaluate(run))
        if last and recipe.train.test_at_end:
            with guards.watchdog.phase(run.step, "evaluation"):
                record.update(evaluate(run, "test"))
        with guards.watchdog.phase(run.step, "logging"):
            if log is not None and (run.step % recipe.logging.interval == 0 or last or evaluated
                                    or out["nonfinite"] or out["stop"]):
                log.log(record)
        finish_saves(run, blocking=bool(stop_reason))
        if stop_reason:
            raise NonfiniteStop(stop_reason)
        if recipe.checkpoint.save and recipe.checkpoint.interval and run.step % recipe.checkpoint.interval == 0:
            with guards.watchdog.phase(run.step, "checkpoint"):
                saved_at = save_checkpoint(run)
        if out["stop"]:
            raise _preempt(run, guards.watchdog, saved_at)
    if recipe.checkpoint.save and run.step > start_step and saved_at != run.step:
        with guards.watchdog.phase(run.step, "checkpoint"):
            save_checkpoint(run)
    with guards.watchdog.phase(run.step, "checkpoint"):
        finish_saves(run, blocking=True)
    return record


def _count_nonfinite(run: Run, guard: NonfiniteGuard, out: dict) -> Optional[str]:
    """Counts a non-finite step (warning on rank 0); returns why the run must stop, or None."""
    if not out["nonfinite"]:
        return None
    reason = guard.count(run.step, out["loss"])
    run.nonfinite_steps = guard.skipped
    if reason is None and run.rank.rank == 0:
        print(guard.warning(run.step, out["loss"]), file=sys.stderr, flush=True)
    return reason


def _preempt(run: Run, watchdog: Watchdog, saved_at: Optional[int]) -> Preempted:
    """Saves the checkpoint of the step every rank stopped after (unless just saved)."""
    where = "checkpoint.save = false: no checkpoint written"
    if run.recipe.checkpoint.save:
        with watchdog.phase(run.step, "checkpoint"):
            if saved_at != run.step:
                save_checkpoint(run)
            finish_saves(run, blocking=True)
        where = f"saved {run.ckpt_dir / checkpoint.checkpoint_name(run.step)}"
    return Preempted(f"preemption signal: stopped after step {run.step}, {where}; "
                     f"resume with checkpoint.load=auto (exit code {Preempted.exit_code})")
