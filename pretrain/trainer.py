"""The training loop: wires recipe, layout, model, data, optimizer, checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from functools import partial
from typing import Iterator, List, Optional

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
from pretrain.config import Recipe, recipe_to_dict, validate_for_world
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
    step: int = 0
    consumed_samples: int = 0  # training samples read so far: the next step starts at this global index


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
        context=layout.context, expert=layout.expert, sequence_parallel=layout.sequence_parallel,
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
    """Train (and valid) samples of data.path / data.blend; every rank calls this at once."""
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
        vocab_size=tokenizer.vocab_size,
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
    return Run(
        recipe=recipe, layout=layout, rank=rank, device=device, chunks=chunks,
        optimizer=optimizer, scheduler=scheduler, data=data, vocab_size=vocab_size,
        log_dir=log_dir_of(recipe), ckpt_dir=ckpt_dir_of(recipe),
    )


def micro_batches(run: Run, samples, first: int) -> Iterator[dict]:
    """This rank's micro-batches of the global batch starting at sample `first`, on the run's device."""
    from data.dataset import get_micro_batch, slice_for_context_parallel

    train = run.recipe.train
    for m in range(num_micro_batches(run)):
        batch = get_micro_batch(
            samples, first, m, run.rank.data_rank, run.layout.data,
            train.micro_batch_size, train.global_batch_size,
        )
        batch = slice_for_context_parallel(batch, run.rank.context_rank, run.layout.context)
        yield {k: v.to(run.device) for k, v in batch.items()}


def num_micro_batches(run: Run) -> int:
    train = run.recipe.train
    return train.global_batch_size // (train.micro_batch_size * run.layout.data)


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


def _forward_backward(run: Run, samples, first: int, forward_only: bool) -> list:
    """megatron-core's schedule for this layout over the global batch starting at sample `first`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [micro_batches(run, samples, first) for _ in run.chunks]
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=run.chunks if len(run.chunks) > 1 else run.chunks[0],
        num_microbatches=num_micro_batches(run),
        seq_length=run.recipe.model.seq_length,
        micro_batch_size=run.recipe.train.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(run: Run) -> dict:
    """One optimizer step over the next global batch; returns loss, grad norm and lr (all ranks)."""
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    run.scheduler.step(increment=1)  # step k (1-based) trains with lr(k): warmup starts above 0
    losses = _forward_backward(run, run.data["train"], run.consumed_samples, forward_only=False)
    run.consumed_samples += run.recipe.train.global_batch_size
    updated, grad_norm, _ = run.optimizer.step()
    return {
        "loss": _global_mean_loss(run, losses),
        "skipped": not updated,  # fp16 overflow: megatron-core skips the update and lowers the scale
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": run.optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Token-mean loss over the first train.eval_steps global batches of the validation samples,
    forward only (every layout, pipeline included); the same samples at every evaluation."""
    gbs = run.recipe.train.global_batch_size
    for chunk in run.chunks:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(run.recipe.train.eval_steps):
        total += _loss_sums(run, _forward_backward(run, run.data["valid"], k * gbs, forward_only=True))
    for chunk in run.chunks:
        chunk.train()
    val_loss = float(total[0] / total[1])
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}


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
        "recipe": recipe_to_dict(run.recipe),
    }


def save_checkpoint(run: Run) -> None:
    path = checkpoint.save(run.ckpt_dir, run.step, run.chunks, run.optimizer, _extra_state(run))
    if run.rank.rank == 0:
        print(f"saved checkpoint {path}", flush=True)


def maybe_resume(run: Run) -> None:
    path = checkpoint.resolve_load(run.recipe.checkpoint.load, run.ckpt_dir)
    if path is None:
        checkpoint.refuse_to_overwrite(run.recipe.checkpoint.load, run.ckpt_dir)
        return
    extra = checkpoint.load(path, run.chunks, run.optimizer)
    run.scheduler.load_state_dict(extra["scheduler"])
    run.step = int(extra["step"])
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
        "pipeline_bubble": pipeline_bubble(run.layout, num_micro_batches(run)),
    }
    if out["skipped"]:
        record["skipped"] = True
    if peak is not None:
        tflops = fpt * tokens_per_s / run.layout.world_size / 1e12
        record["tflops_per_device"] = tflops
        record["mfu"] = tflops / peak
    return record


def train(recipe: Recipe) -> dict:
    """Trains `recipe` to `train.steps`; returns the last metrics record (on every rank)."""
    run = build_run(recipe)
    maybe_resume(run)
    tokens_per_step = recipe.train.global_batch_size * recipe.model.seq_length
    fpt = flops_per_token(recipe.model, run.vocab_size)
    peak = device_peak_tflops(torch.cuda.get_device_name() if run.device.type == "cuda" else None)
    log = None
    if run.rank.rank == 0:
        log = MetricsLog(run.log_dir, run.step, recipe_to_dict(recipe), recipe.logging)
        print(f"layout: {run.layout.describe()}; {num_micro_batches(run)} micro-batches/step", flush=True)
    record = {}
    interval = recipe.checkpoint.interval
    start_step = run.step
    while run.step < recipe.train.steps:
        start = time.perf_counter()
        out = train_step(run)
        run.step += 1
        record = _metrics_record(run, out, time.perf_counter() - start, tokens_per_step, fpt, peak)
        last = run.step == recipe.train.steps
        evaluated = recipe.train.eval_interval and (run.step % recipe.train.eval_interval == 0 or last)
        if evaluated:
            record.update(evaluate(run))
        if log is not None and (run.step % recipe.logging.interval == 0 or last or evaluated):
            log.log(record)
        if recipe.checkpoint.save and interval and run.step % interval == 0:
            save_checkpoint(run)
    trained = run.step > start_step
    if recipe.checkpoint.save and trained and (not interval or run.step % interval != 0):
        save_checkpoint(run)
    if log is not None:
        log.close()
    return record
