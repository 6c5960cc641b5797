"""The `logging` recipe section and per-step metrics: the record, when to log it, metrics.jsonl,
wandb (offline without a key), and human progress on stdout."""

from __future__ import annotations

import json
import math
import os
import pathlib
import secrets
import string
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import RecipeError
from common.schema import PositiveInt
from model.config import ModelConfig
from planning.flops import model_forward_flops


@dataclass
class WandbConfig:
    project: str = "pretrain"
    name: str | None = None  # None = logging.name
    mode: Literal["online", "offline", "disabled"] = "offline"


@dataclass
class LoggingConfig:
    name: str = "run"  # run name; no '/'
    dir: str | None = None  # None = runs/<name>
    interval: PositiveInt = 1  # log every N steps
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> None:
        if not self.name or "/" in self.name:
            raise RecipeError(f"logging.name must be a non-empty name without '/', got '{self.name}'")


def flops_per_token(model: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token: forward + backward = 3 × the forward of planning/flops.py (the one
    FLOPs model; Megatron-LM's accounting: matmuls, with MoE only the active experts, and half the
    causal attention square; the embedding lookup and the norms are free)."""
    return 3.0 * model_forward_flops(model, vocab_size)


def document_pairs(batches: list[dict]) -> float:
    """Σ n²/2 over the documents of the micro-batches' samples (their "document_ids"): the attended
    pairs as flops_per_token counts a whole sample's (s²/2)."""
    from model.attention.documents import runs

    return sum((b - a) ** 2 / 2 for batch in batches for ids in batch["document_ids"] for a, b in runs(ids))


class Metrics:
    """Builds each step's record and logs it when due: every `logging.interval` steps, the last step,
    a step with an evaluation, a skipped or stopping step. Every rank builds records (they return
    the last one); only the rank holding `log` writes."""

    def __init__(
        self,
        cfg: LoggingConfig,
        log: MetricsLog | None,
        tokens_per_step: int,
        seq_length: int,
        flops_per_token: float,
        peak_tflops: float | None,
        world_size: int,
        micro_batches: int,
        pipeline_bubble: float,
        fp8_peak_tflops: float | None = None,  # FP8 runs on a GPU with an FP8 peak: adds mfu_fp8
        pair_flops: float = 0.0,  # attention_flops_per_pair: a step with documents counts its own pairs
    ):
        self.pair_flops = pair_flops
        self.cfg, self.log = cfg, log
        self.fp8_peak_tflops = fp8_peak_tflops
        self.tokens_per_step, self.seq_length = tokens_per_step, seq_length
        self.flops_per_token, self.peak_tflops, self.world_size = flops_per_token, peak_tflops, world_size
        self.micro_batches, self.pipeline_bubble = micro_batches, pipeline_bubble

    def record(
        self, step: int, consumed_samples: int, nonfinite_steps: int, result: Any, step_time: float
    ) -> dict[str, Any]:
        """metrics.jsonl's fields for step `step` (1-based) from a pretrain.step.StepResult."""
        tokens_per_s = self.tokens_per_step / step_time
        record: dict[str, Any] = {
            "step": step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "consumed_tokens": consumed_samples * self.seq_length,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "micro_batches": self.micro_batches,
            "nonfinite_steps": nonfinite_steps,
            "pipeline_bubble": self.pipeline_bubble,
        }
        if not result.updated:
            record["skipped"] = True
        record.update(result.moe)
        if getattr(result, "mtp_loss", None) is not None:
            record["mtp_loss"] = result.mtp_loss
        flops_per_token = self.flops_per_token
        if getattr(result, "attention_pairs", None) is not None:
            # data.reset_attention_mask: only the pairs inside documents are computed and counted
            whole = self.tokens_per_step // self.seq_length * self.seq_length**2 / 2
            record["attended_fraction"] = result.attention_pairs / whole
            flops_per_token -= self.pair_flops * (whole - result.attention_pairs) / self.tokens_per_step
        if self.peak_tflops is not None:
            tflops = flops_per_token * tokens_per_s / self.world_size / 1e12
            record["tflops_per_device"] = tflops
            record["mfu"] = tflops / self.peak_tflops
            if self.fp8_peak_tflops is not None:
                record["mfu_fp8"] = tflops / self.fp8_peak_tflops
        return record

    def after_step(self, record: dict[str, Any], result: Any, last: bool, evaluated: bool) -> None:
        due = record["step"] % self.cfg.interval == 0 or last or evaluated or result.nonfinite or result.stop
        if self.log is not None and due:
            self.log.log(record)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class MetricsLog:
    """Writes one JSON object per logged step; only the logging rank creates one."""

    def __init__(self, log_dir: pathlib.Path, resume_step: int, recipe_dict: dict, cfg: LoggingConfig):
        self.path = log_dir / "metrics.jsonl"
        log_dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resume_step)
        self.cfg = cfg
        self.wandb_run = _init_wandb(cfg, log_dir, recipe_dict)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_scalars(record), step=record["step"])
        print(_progress_line(record), flush=True)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


REPLACED_METRICS = "metrics.replaced.jsonl"


def _truncate_after(path: pathlib.Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint, so the file holds one curve; the
    records it drops are appended to metrics.replaced.jsonl beside it, and a line says so."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    steps = [_step_of(line) for line in lines]
    dropped = [line for line, s in zip(lines, steps) if s is None or s > step]
    if not dropped:
        return
    side = path.with_name(REPLACED_METRICS)
    with open(side, "a") as f:
        f.write("".join(line + "\n" for line in dropped))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line, s in zip(lines, steps) if s is not None and s <= step))
    os.replace(tmp, path)
    later = [s for s in steps if s is not None and s > step]
    what = f"steps {min(later)}-{max(later)}" if later else f"{len(dropped)} unreadable lines"
    print(
        f"{path}: {what} ({len(dropped)} records) moved to {side}: this run rewrites them from step {step + 1}",
        flush=True,
    )


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


WANDB_RUN_ID_FILE = "wandb_run_id"


def wandb_run_id(log_dir: pathlib.Path) -> str:
    """The wandb run id of the run in `log_dir`: read from `<log_dir>/wandb_run_id`, or made and
    written there by the first job, so every resumed job logs to the same wandb run."""
    path = log_dir / WANDB_RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's id form
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def _init_wandb(cfg: LoggingConfig, log_dir: pathlib.Path, recipe_dict: dict) -> Any:
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    mode = cfg.wandb.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
        print("wandb: no API key found, logging offline (wandb sync later)", file=sys.stderr)
        mode = "offline"
    return wandb.init(
        project=cfg.wandb.project,
        name=cfg.wandb.name or cfg.name,
        mode=mode,
        dir=str(log_dir),
        config=recipe_dict,
        id=wandb_run_id(log_dir),
        resume="allow",  # a resumed job continues the run; `wandb sync` merges its offline parts
    )


def _has_netrc_key() -> bool:
    netrc = pathlib.Path(os.environ.get("NETRC", pathlib.Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _progress_line(r: dict) -> str:
    parts = [
        f"step {r['step']:>6}",
        f"loss {r['loss']:.4f}",
        *([f"mtp_loss {r['mtp_loss']:.4f}"] if "mtp_loss" in r else []),
        f"lr {r['lr']:.3e}",
        f"grad_norm {r['grad_norm']:.3f}",
        f"{r['tokens_per_s']:.0f} tok/s",
        f"{r['step_time_s'] * 1000:.0f} ms",
    ]
    for key in ("val_loss", "test_loss"):
        if key in r:
            parts.append(f"{key} {r[key]:.4f}")
    if r.get("mfu") is not None and not math.isnan(r["mfu"]):
        fp8 = f", {100 * r['mfu_fp8']:.1f}% of fp8 peak" if "mfu_fp8" in r else ""
        parts.append(f"mfu {100 * r['mfu']:.1f}% of bf16 peak{fp8}")
    return " | ".join(parts)


def wandb_scalars(record: dict) -> dict:
    """A metrics record as flat wandb scalars: nested fields become slash paths, so the per-layer
    expert load {"moe_expert_load": {"1": [f0, f1, ...]}} is one chart per expert under
    moe_expert_load/layer_1/expert_<e>."""
    flat = {}
    for key, value in record.items():
        if key == "step":
            continue
        if key == "moe_expert_load":
            for layer, fractions in value.items():
                for expert, fraction in enumerate(fractions):
                    flat[f"{key}/layer_{layer}/expert_{expert}"] = fraction
        elif isinstance(value, dict):
            for layer, number in value.items():
                flat[f"{key}/layer_{layer}"] = number
        else:
            flat[key] = value
    return flat
