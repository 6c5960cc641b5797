"""The `optimizer` recipe section, and the optimizer and LR schedule it builds (megatron-core's)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from common.errors import RecipeError
from common.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

if TYPE_CHECKING:
    from model.precision import Precision  # torch: the recipe loads without it


@dataclass
class OptimizerConfig:
    """AdamW (or Muon for the hidden matrices, AdamW for the rest) with linear warmup then a decay
    schedule down to min_lr. docs/optimizers.md says which parameters each one steps."""

    # adamw: every parameter; muon: Muon for the hidden weight matrices (pretrain/muon.py), AdamW with
    # the keys below for the embedding, the output layer, norms and biases; one LR schedule for both
    name: Literal["adamw", "muon"] = "adamw"
    lr: PositiveFloat = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: NonNegativeFloat = 3e-5  # learning rate at the end of decay
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # YAML gives a list of 2 floats
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0  # optimizer steps of linear warmup from 0 to lr
    decay: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    decay_steps: PositiveInt | None = None  # None = train.steps - warmup_steps
    wsd_decay_steps: PositiveInt | None = None  # only for decay: wsd; None = 10% of decay_steps
    # Muon's keys (name: muon only; megatron-core's muon_* names, torch.optim.Muon's defaults)
    momentum: float = 0.95  # megatron-core muon_momentum
    nesterov: bool = True  # megatron-core muon_use_nesterov
    ns_steps: NonNegativeInt = 5  # Newton-Schulz iterations (megatron-core muon_num_ns_steps)
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)  # the quintic's (a, b, c)
    ns_eps: PositiveFloat = 1e-7  # the update is divided by max(its Frobenius norm, ns_eps) first
    # the iteration's precision: fp32 keeps the curve the same at every layout (1e-5); bf16 is
    # torch.optim.Muon's (faster on GPUs; rounding flips of the momentum's last bits move it ~1e-4)
    ns_dtype: Literal["fp32", "bf16"] = "fp32"
    # the learning rate of a [rows, cols] matrix times: match_rms_adamw 0.2 sqrt(max(rows, cols)) (AdamW's
    # update RMS, so AdamW's lr and weight decay carry over); original sqrt(max(1, rows / cols)) (torch's names)
    adjust_lr: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    split_qkv: bool = True  # orthogonalize Q, K and V apart (megatron-core muon_split_qkv); false: QKV whole
    qk_clip: PositiveFloat | None = None  # MuonClip's attention-logit threshold: refused (docs/optimizers.md)
    # Optimizer state off the GPU (megatron-core's optimizer_cpu_offload, AdamW only): the fp32
    # master weights and Adam's moments of offload_fraction of the parameters (by element count, in
    # parameter order) live in host memory and are stepped there by torch's AdamW; gradients are
    # copied to the host and the updated weights back every step. The curve does not change.
    cpu_offload: bool = False
    offload_fraction: PositiveFloat = 1.0  # megatron-core optimizer_offload_fraction; (0, 1]

    def check(self) -> None:
        if self.name != "muon":
            changed = [k for k, v in _MUON_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                raise RecipeError(f"optimizer.{changed[0]} is a Muon key: set optimizer.name = muon to use it")
        self._check_offload()
        if self.qk_clip is not None:
            raise RecipeError(
                "optimizer.qk_clip: MuonClip is not supported (megatron-core clips through its own attention's "
                "logit statistics, which our attention does not record); remove the key"
            )
        if not 0 <= self.momentum < 1:
            raise RecipeError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if self.min_lr > self.lr:
            raise RecipeError(f"optimizer.min_lr = {self.min_lr} exceeds optimizer.lr = {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise RecipeError(f"optimizer.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.wsd_decay_steps is not None and self.decay != "wsd":
            raise RecipeError(
                f"optimizer.wsd_decay_steps is only used with optimizer.decay = wsd, got optimizer.decay = {self.decay}"
            )
        if (
            self.wsd_decay_steps is not None
            and self.decay_steps is not None
            and self.wsd_decay_steps > self.decay_steps
        ):
            raise RecipeError(
                f"optimizer.wsd_decay_steps = {self.wsd_decay_steps} exceeds optimizer.decay_steps = {self.decay_steps}"
            )

    def _check_offload(self) -> None:
        if not self.cpu_offload:
            if self.offload_fraction != 1.0:
                raise RecipeError(
                    f"optimizer.offload_fraction = {self.offload_fraction} is only read with optimizer.cpu_offload = true"
                )
            return
        if self.name != "adamw":
            raise RecipeError(
                f"optimizer.cpu_offload = true with optimizer.name = {self.name}: megatron-core's offload steps "
                "AdamW only (its host optimizer is torch's AdamW); set optimizer.cpu_offload = false"
            )
        if self.offload_fraction > 1:
            raise RecipeError(f"optimizer.offload_fraction must be in (0, 1], got {self.offload_fraction}")


@dataclass(frozen=True)
class Numerics:
    """What the optimizer needs from the train section."""

    precision: Precision
    grad_clip: float
    tokens_per_micro_batch: int  # fp16's initial loss scale depends on it
    # transformer-engine's FP8 recipe when it runs the GEMMs (its FP8 weights need the distributed
    # optimizer to know it); None otherwise, the local FP8 path included (its weights are bf16)
    te_fp8_recipe: str | None = None


def build_optimizer(
    cfg: OptimizerConfig,
    numerics: Numerics,
    chunks: list[Any],
    distributed: bool,
    fp32_params: bool = False,
    groups: Any = None,
) -> Any:
    """megatron-core's (distributed) Adam over the model chunks; stepped once per training step.
    `fp32_params`: the parameters are the fp32 master weights whatever the training precision (fully
    sharded: FSDP casts them for compute), so Adam steps them directly, with no fp16/bf16 copy.
    optimizer.name = muon: the same wrappers, with Muon for the hidden matrices (`groups`: the
    process groups it gathers a split matrix over)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    half = not fp32_params
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_eps=cfg.eps,
        clip_grad=numerics.grad_clip,
        bf16=half and numerics.precision.bf16,
        fp16=half and numerics.precision.fp16,
        params_dtype=chunks[0].config.params_dtype,
        use_distributed_optimizer=distributed,
        initial_loss_scale=initial_loss_scale(numerics.tokens_per_micro_batch),
        fp8_recipe=numerics.te_fp8_recipe,
        optimizer_cpu_offload=cfg.cpu_offload,
        optimizer_offload_fraction=cfg.offload_fraction if cfg.cpu_offload else 0.0,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    if cfg.name == "muon":
        import torch

        from pretrain.muon import MuonSettings, install

        ns_dtype = torch.float32 if cfg.ns_dtype == "fp32" else torch.bfloat16
        settings = MuonSettings(
            cfg.momentum,
            cfg.nesterov,
            cfg.ns_steps,
            cfg.ns_coefficients,
            cfg.ns_eps,
            ns_dtype,
            cfg.adjust_lr,
            cfg.split_qkv,
        )
        adamw = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        install(optimizer, chunks, groups, settings, adamw)
    return optimizer


def check_offload(cfg: OptimizerConfig, fsdp: str | None, distributed: bool, precision: str) -> None:
    """optimizer.cpu_offload against the layout and precision: the combinations megatron-core 0.16's
    HybridDeviceOptimizer runs (docs/optimizers.md); each other one fails inside it, on a GPU too."""
    if not cfg.cpu_offload:
        return
    why = None
    if fsdp is not None:
        why = f"parallel.fsdp = {fsdp} (its DTensor shards are not verified in megatron-core's host optimizer)"
    elif precision != "fp32" and not distributed:
        why = (
            f"train.precision = {precision} without parallel.distributed_optimizer (megatron-core's {precision} "
            "wrapper replaces the parameters the host optimizer has copied: KeyError at the first step)"
        )
    elif distributed and precision == "fp16":
        why = "parallel.distributed_optimizer with train.precision = fp16 (not verified)"
    if why:
        raise RecipeError(
            f"optimizer.cpu_offload = true is not supported with {why}; offload runs with fp32 (with or without "
            "the distributed optimizer) and with bf16 and the distributed optimizer"
        )


def host_share(optimizer: Any) -> tuple[int, int]:
    """optimizer.cpu_offload: (elements whose optimizer state and step are on the host, elements
    this rank's optimizer steps), read from megatron-core's HybridDeviceOptimizer; (0, n) without it."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    def numel(optimizer: Any) -> int:
        return sum(p.numel() for group in optimizer.param_groups for p in group["params"])

    host = total = 0
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = wrapper.optimizer
        total += numel(inner)
        if isinstance(inner, HybridDeviceOptimizer):
            host += sum(numel(cpu) for cpu in inner.cpu_optimizers)
    return host, total


_MUON_DEFAULTS = {
    k: OptimizerConfig.__dataclass_fields__[k].default
    for k in ("momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_eps", "ns_dtype", "adjust_lr", "split_qkv")
}

_DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "wsd": "WSD", "constant": "constant"}


def build_scheduler(cfg: OptimizerConfig, steps: int, optimizer: Any) -> Any:
    """Megatron's OptimizerParamScheduler in optimizer steps; the recipe's schedule wins on resume."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = cfg.decay_steps or max(steps - cfg.warmup_steps, 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=cfg.warmup_steps + decay_steps,
        lr_decay_style=_DECAY_STYLES[cfg.decay],
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        wsd_decay_steps=cfg.wsd_decay_steps or max(decay_steps // 10, 1),
        lr_wsd_decay_style="linear",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def initial_loss_scale(tokens_per_micro_batch: int) -> float:
    """fp16 only: the backpropagated loss is a token *sum* (per-token loss, normalized after the
    all-reduce), so start the dynamic scale where 2^16 / tokens-per-micro-batch keeps it in fp16
    range, instead of megatron-core's 2^32, which skips the first ~40 steps while it backs off."""
    return float(2 ** max(int(math.log2(2**16 / tokens_per_micro_batch)), 0))


def current_lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])
