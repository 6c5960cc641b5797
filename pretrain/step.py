"""One training step and one evaluation: megatron-core's forward/backward schedule over this rank's
micro-batches, the per-token loss, the guarded optimizer step; each returns a typed result."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from common.errors import AgreedUserError
from data.dataset import Samples
from data.loader import BatchPlan, token_ids_beyond
from model.mtp import take_mtp_loss
from model.precision import Precision
from pretrain.faults import FaultInjection
from pretrain.guards import Guards, Watchdog, agree, grads_are_finite
from pretrain.metrics import document_pairs
from pretrain.oom import OutOfMemoryInStep
from pretrain.optim import current_lr

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.module import MegatronModule

    from model.moe import MoeMonitor


@dataclass(frozen=True)
class StepResult:
    loss: float  # token-mean LM loss over the global batch, the same on every rank
    grad_norm: float  # before clipping; NaN when the optimizer did not run
    lr: float
    updated: bool  # the optimizer applied the step (not on a non-finite step or an fp16 overflow)
    nonfinite: bool  # every rank agreed the loss or the gradients were not finite
    stop: bool  # a stop signal (a preemption, or Ctrl-C) arrived on some rank
    interrupted: bool = False  # ... and it was Ctrl-C on some rank
    moe: dict[str, Any] = field(default_factory=dict)
    # data.reset_attention_mask: Σ n²/2 over the global batch's documents (pretrain/metrics.py)
    attention_pairs: float | None = None
    mtp_loss: float | None = None  # model.mtp_num_layers: the MTP modules' loss (model/mtp.py:mtp_loss)


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of masked token losses; megatron-core divides by the global token count."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """megatron-core's forward step: the next micro-batch through the model, and its loss function.
    With data.reset_attention_mask the batch's document ids [b, s] go where megatron-core passes an
    attention mask to every layer's core attention (model/attention/documents.py). The loss mask goes
    to the model too, for multi-token prediction: module k's loss at i counts where the LM loss at
    i+k does (megatron-core rolls it; Megatron-LM's pretrain_gpt.py passes it so)."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("document_ids"),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def seed_step(seed: int, step: int) -> None:
    """Reseeds every random stream (dropout: data-parallel, tensor-parallel and expert trackers)
    from (train.seed, step) before step `step`, so random draws are a function of the step alone:
    a resumed run draws exactly what the uninterrupted one did, and checkpoints need no RNG state."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.layers import derive_seed

    step_seed = derive_seed(seed, step + 1) % (2**31)  # megatron adds offsets: keep it in int32 range
    torch.manual_seed(step_seed)
    model_parallel_cuda_manual_seed(step_seed)


def wire_schedule(chunks: list[MegatronModule], optimizer: MegatronOptimizer) -> None:
    """The hooks megatron-core's schedules call: grad sync control and grad finalization."""
    from megatron.core.distributed import finalize_model_grads

    config = chunks[0].config
    no_sync = [c.no_sync for c in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss


@dataclass
class Stepper:
    """Runs steps and evaluations of one rank: what megatron-core's schedule needs, wired once.
    (A Stepper runs steps; `step` is always a step number.)"""

    chunks: list[MegatronModule]  # DDP/FSDP-wrapped model chunks (one per virtual pipeline stage)
    optimizer: MegatronOptimizer  # megatron-core's (Muon inside its wrappers: pretrain/muon.py)
    scheduler: OptimizerParamScheduler
    plan: BatchPlan  # this rank's share of each global batch
    seq_length: int
    seed: int
    precision: Precision
    faults: FaultInjection  # the `debug` section's faults, injected around each training forward/backward
    device: torch.device
    groups: ProcessGroupCollection
    vocab_size: int  # the model's (unpadded) vocabulary: every token id must be below it
    moe: MoeMonitor | None = None  # when the model has experts

    def __post_init__(self) -> None:
        wire_schedule(self.chunks, self.optimizer)
        self._mtp = bool(self.chunks[0].config.mtp_num_layers)

    def train(self, step: int, batches: list[dict], guards: Guards) -> StepResult:
        """Optimizer step `step` (0-based) over this rank's micro-batches of the global batch. Raises
        OutOfMemoryInStep (step, phase) for a device out-of-memory error."""
        phase = ["forward_backward"]
        try:
            return self._train(step, batches, guards, phase)
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryInStep(step + 1, phase[0], str(e), self.device) from None

    def _train(self, step: int, batches: list[dict], guards: Guards, phase: list[str]) -> StepResult:
        seed_step(self.seed, step)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.scheduler.step(increment=1)  # step k (1-based) trains with lr(k): warmup starts above 0
        with (
            guards.watchdog.phase(step + 1, "forward_backward"),
            self.faults.around(step, self.chunks, forward_step) as forward,
        ):
            self.faults.out_of_memory(step + 1, "forward_backward")
            losses = self._forward_backward(batches, forward)
        phase[0] = "optimizer"
        with guards.watchdog.phase(step + 1, "optimizer"):
            self.faults.out_of_memory(step + 1, "optimizer")
            pairs = document_pairs(batches) if "document_ids" in batches[0] else None
            totals = self._loss_sums(losses, pairs)
            loss = float(totals[0] / totals[1])
            # fp16 gradients overflow by design while the loss scale adjusts: megatron-core's optimizer
            # finds those itself (and skips the update), so only the loss is ours to check there.
            check_grads = not self.precision.fp16
            bad = not math.isfinite(loss) or (check_grads and not grads_are_finite(self.chunks))
            nonfinite, stop, interrupted = agree([bad, guards.stop.requested, guards.stop.interrupted], self.device)
            updated, grad_norm = False, None
            if not nonfinite:
                updated, grad_norm, _ = self.optimizer.step()
        moe = {}
        if self.moe is not None:
            moe = self.moe.step_metrics(
                self.device, self.plan.micro_batches, self.plan.dp_size, dist.get_world_size() // self.groups.pp.size()
            )
        return StepResult(
            loss=loss,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=current_lr(self.optimizer),
            updated=updated,
            nonfinite=nonfinite,
            stop=stop,
            interrupted=interrupted,
            moe=moe,
            attention_pairs=float(totals[2]) if pairs is not None else None,
            mtp_loss=float(totals[3]) / (self.plan.micro_batches * self.groups.dp_cp.size()) if self._mtp else None,
        )

    def check_token_ids(self, batches: list[dict], samples: Samples, first: int) -> None:
        """Raises AgreedUserError on every rank when any rank's micro-batches of the global batch at
        sample `first` hold a token id outside the vocabulary (a corpus built with another
        tokenizer), before the embedding would fail on it; one small all-reduce."""
        extremes = torch.zeros(2, dtype=torch.int64, device=self.device)  # [max id, -min id]
        for batch in batches:
            for key in ("tokens", "labels"):
                extremes = torch.maximum(extremes, torch.stack([batch[key].max(), -batch[key].min()]))
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        highest, lowest = extremes.tolist()
        if highest >= self.vocab_size or lowest > 0:
            raise AgreedUserError(token_ids_beyond(samples, first, self.plan.global_batch_size, self.vocab_size))

    @torch.no_grad()
    def evaluate(self, samples: Samples, eval_steps: int, prefix: str) -> dict[str, float]:
        """Token-mean loss over the first `eval_steps` global batches of `samples`, forward only
        (every layout, pipeline included); the same samples at every evaluation. Returns
        {<prefix>_loss, <prefix>_ppl}."""
        for chunk in self.chunks:
            chunk.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for k in range(eval_steps):
            batches = self.plan.step_batches(samples, k * self.plan.global_batch_size, self.device)
            self.check_token_ids(batches, samples, k * self.plan.global_batch_size)
            total += self._loss_sums(self._forward_backward(batches, forward_step, forward_only=True))[:2]
        for chunk in self.chunks:
            chunk.train()
        loss = float(total[0] / total[1])
        return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 700.0))}

    def _forward_backward(self, batches: list[dict], forward: Callable, forward_only: bool = False) -> list:
        """megatron-core's schedule for this layout over this rank's micro-batches of one global batch,
        `forward` its forward step."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        iterators = [iter(batches) for _ in self.chunks]  # every model chunk reads the same micro-batches
        return get_forward_backward_func()(
            forward_step_func=forward,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=self.plan.micro_batches,
            seq_length=self.seq_length,
            micro_batch_size=self.plan.micro_batch_size,
            forward_only=forward_only,
        )

    def _loss_sums(self, losses: list, pairs: float | None = None) -> torch.Tensor:
        """[loss sum, token count, attended pairs, MTP loss sum] over the global batch (float64, CPU), made known
        to every rank: summed over the data- and context-parallel ranks of the last pipeline stage,
        which then sends it to all (from the last rank, which is on the last stage). `pairs`: this
        rank's micro-batches' (each CP rank holds the whole document ids: counted once)."""
        total = torch.zeros(4, dtype=torch.float64)
        if self.groups.pp.rank() == self.groups.pp.size() - 1:
            for item in losses:
                total[:2] += item["lm loss"].detach().to("cpu", torch.float64)
            total[2] = (pairs or 0.0) / self.groups.cp.size()
            total[3] = take_mtp_loss()  # this rank's micro-batch means, summed: averaged by the caller
            dist.all_reduce(total, group=self.groups.dp_cp)
        total = total.to(self.device)
        dist.broadcast(total, src=dist.get_world_size() - 1)
        return total.cpu()


@dataclass
class Evaluation:
    """When to evaluate: validation every `interval` steps and after the last, the test share after
    the last when asked for; each over `eval_steps` global batches."""

    stepper: Stepper
    samples: dict[str, Samples]  # split name -> samples
    interval: int  # train.eval_interval; 0 = never
    eval_steps: int
    test_at_end: bool

    def after(self, step: int, last: bool, watchdog: Watchdog) -> dict[str, float]:
        """The evaluation metrics due after step `step` (1-based); {} when none is."""
        out: dict[str, float] = {}
        if self.interval and (step % self.interval == 0 or last):
            with watchdog.phase(step, "evaluation"):
                out.update(self.stepper.evaluate(self.samples["valid"], self.eval_steps, "val"))
        if last and self.test_at_end:
            with watchdog.phase(step, "evaluation"):
                out.update(self.stepper.evaluate(self.samples["test"], self.eval_steps, "test"))
        return out
