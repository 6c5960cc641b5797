"""The layout planner: `python -m pretrain.plan --recipe R --gpus N --gpu-memory-gib G [--gpu h100]`
lists the layouts (tensor, pipeline, virtual, context, expert, data, recompute, micro-batch) whose
worst rank fits, fastest first by the analytic step time (pretrain/step_time.py), and prints the best
as recipe overrides, with a Chinchilla back-of-envelope for the recipe's model."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from typing import Any

from common.errors import RecipeError, UserError, run_tool
from pretrain.recipe import Recipe

CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022, compute-optimal training
MICRO_BATCHES = (1, 2, 4, 8)
CONTEXTS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Candidate:
    overrides: dict[str, Any]  # recipe keys -> values
    setup: Any  # pretrain.memory.Setup
    time: Any  # pretrain.step_time.StepTime
    needed: int = 0  # worst peak plus the device reserve; 0 until estimated


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _recomputes(recipe: Recipe, cache: dict[tuple, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A short ladder of recompute settings, cheapest first (the planner's, not the dry run's search);
    which are valid depends only on the layers per model chunk, so `cache` keeps them per split."""
    from pretrain.memory_report import recompute_candidates

    p = recipe.parallel
    key = (p.pipeline, p.virtual_pipeline, p.first_stage_layers, p.last_stage_layers)
    if key in cache:
        return cache[key]
    wanted = [
        {"recompute_granularity": None},
        {"recompute_granularity": "selective", "recompute_modules": ["layernorm"]},
        {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "layernorm"]},
        {"recompute_granularity": "selective", "recompute_modules": ["layernorm", "mlp"]},
        {"recompute_granularity": "selective", "recompute_modules": ["layernorm", "moe"]},
        {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    ]
    possible = recompute_candidates(recipe)
    cache[key] = [w for w in wanted if w in possible]
    return cache[key]


def layouts(recipe: Recipe, gpus: int, gpu_per_node: int) -> Iterator[dict[str, Any]]:
    """Every parallel layout of `gpus` ranks the recipe's shapes allow (as recipe overrides)."""
    m, t = recipe.model, recipe.train
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    tensors = [d for d in _divisors(gpus) if d <= gpu_per_node and heads % d == 0 and groups % d == 0]
    experts = _divisors(m.moe.num_experts) if m.moe.num_experts else [1]
    for tp in tensors:
        for pp in (d for d in _divisors(m.num_layers) if gpus % (tp * d) == 0):
            for cp in (c for c in CONTEXTS if gpus % (tp * pp * c) == 0 and m.seq_length % (2 * c) == 0):
                dp = gpus // (tp * pp * cp)
                for vpp in [None] + [v for v in _divisors(m.num_layers // pp) if v > 1 and pp > 1]:
                    for ep in (e for e in experts if (gpus // pp) % (e * tp) == 0):
                        for mbs in (b for b in MICRO_BATCHES if t.global_batch_size % (b * dp) == 0):
                            yield {
                                "parallel.tensor": tp,
                                "parallel.pipeline": pp,
                                "parallel.virtual_pipeline": vpp,
                                "parallel.context": cp,
                                "parallel.expert": ep,
                                "parallel.sequence_parallel": tp > 1,
                                "parallel.distributed_optimizer": dp * cp > 1,
                                "train.micro_batch_size": mbs,
                            }


def no_layout(recipe: Recipe, gpus: int, gpu_per_node: int) -> str:
    """Why `layouts` yields nothing (or nothing that passes the model's checks) for `gpus` GPUs."""
    m, t = recipe.model, recipe.train
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    data_sizes = sorted(
        {
            gpus // (tp * pp * cp)
            for tp in _divisors(gpus)
            if tp <= gpu_per_node and heads % tp == 0 and groups % tp == 0
            for pp in _divisors(m.num_layers)
            if gpus % (tp * pp) == 0
            for cp in CONTEXTS
            if gpus % (tp * pp * cp) == 0 and m.seq_length % (2 * cp) == 0
        }
    )
    return (
        f"no parallel layout of {gpus} GPUs exists for {recipe.source}: tensor must divide the {heads} heads, "
        f"{groups} query groups and {gpu_per_node} GPUs per node, pipeline the {m.num_layers} layers, and the "
        f"data-parallel size that leaves ({', '.join(map(str, data_sizes))}) must divide "
        f"train.global_batch_size {t.global_batch_size}: use another --gpus"
    )


def _apply(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        recipe, **{s: dataclasses.replace(getattr(recipe, s), **fields) for s, fields in sections.items()}
    )


def candidates(recipe: Recipe, gpus: int, gpu: Any, vocab: int) -> list[Candidate]:
    """Every valid (layout, recompute) with its step time, fastest first."""
    from model.config import check_model
    from pretrain.memory import Target, setup_for
    from pretrain.step_time import step_time

    target = Target.for_device("cuda", recipe.model.transformer_impl)
    out: list[Candidate] = []
    cache: dict[tuple, list[dict[str, Any]]] = {}
    for layout in layouts(recipe, gpus, gpu.gpus_per_node):
        base = _apply(recipe, layout)
        for fields in _recomputes(base, cache):
            planned = _apply(base, {f"model.{k}": v for k, v in _recompute_fields(fields).items()})
            try:
                check_model(planned.model, planned.parallel)
                setup = setup_for(planned, gpus, target, vocab)
            except RecipeError:
                continue
            overrides = layout | {f"model.{k}": v for k, v in fields.items()}
            out.append(Candidate(overrides, setup, step_time(setup, gpu)))
    return sorted(out, key=lambda c: c.time.total)


def _recompute_fields(fields: dict[str, Any]) -> dict[str, Any]:
    unset = {"recompute_granularity": None, "recompute_modules": None, "recompute_method": None}
    return unset | {"recompute_num_layers": None} | fields


def fitting(ordered: list[Candidate], gpu_bytes: int, top: int) -> tuple[list[Candidate], int]:
    """The first `top` candidates (fastest first) whose worst rank fits; how many were estimated."""
    from pretrain.memory import estimate_setup
    from pretrain.memory_report import reserve_bytes

    found, tried = [], 0
    for c in ordered:
        tried += 1
        peak = estimate_setup(c.setup).worst.peak
        needed = peak + reserve_bytes(peak, c.setup.target)
        if needed <= gpu_bytes:
            found.append(dataclasses.replace(c, needed=needed))
            if len(found) == top:
                break
    return found, tried


# ------------------------------------------------------------------------------------------ output


def _recompute_text(overrides: dict[str, Any]) -> str:
    granularity = overrides.get("model.recompute_granularity")
    if granularity is None:
        return "none"
    if granularity == "selective":
        return "selective " + ",".join(overrides["model.recompute_modules"])
    return f"full {overrides['model.recompute_method']} {overrides['model.recompute_num_layers']}"


def table(found: list[Candidate], gpu: Any, gpus: int) -> list[str]:
    lines = [
        "  #  tensor pipeline virtual context expert  data  recompute                 micro  needed GiB  step s    MFU"
    ]
    for i, c in enumerate(found, 1):
        o, layout = c.overrides, c.setup.layout
        mfu = c.time.mfu(gpu, c.setup.recipe.train.precision, gpus)
        lines.append(
            f"{i:>3}  {o['parallel.tensor']:>6} {o['parallel.pipeline']:>8} {o['parallel.virtual_pipeline'] or '-':>7} "
            f"{o['parallel.context']:>7} {o['parallel.expert']:>6} {layout.data:>5}  {_recompute_text(o):<24}  "
            f"{o['train.micro_batch_size']:>5}  {c.needed / 2**30:>10.1f}  {c.time.total:>6.2f}  {100 * mfu:>4.1f} %"
        )
    return lines


def as_overrides(overrides: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return f"[{','.join(v)}]"
        return str(v)

    return " ".join(f"{k}={text(v)}" for k, v in overrides.items())


def chinchilla(recipe: Recipe, vocab: int, best: Candidate) -> list[str]:
    """Hoffmann et al. 2022: about 20 tokens per parameter (active parameters for MoE)."""
    from model.gpt import parameter_counts

    counts = parameter_counts(recipe.model, vocab)
    params = counts.active
    tokens = CHINCHILLA_TOKENS_PER_PARAMETER * params
    per_step = recipe.train.global_batch_size * recipe.model.seq_length
    steps = -(-tokens // per_step)
    days = steps * best.time.total / 86400
    kind = "active " if counts.active != counts.total else ""
    return [
        f"Chinchilla (Hoffmann et al. 2022, ~{CHINCHILLA_TOKENS_PER_PARAMETER} tokens per parameter): "
        f"{params / 1e9:.2f}B {kind}parameters -> {tokens / 1e12:.2f}T tokens = {steps:,} steps of "
        f"{recipe.train.global_batch_size} x {recipe.model.seq_length} tokens; "
        f"{days:.1f} days at the best layout's {best.time.total:.2f} s per step",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pretrain.step_time import GPUS

    parser = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value, applied before planning")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, required=True)
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    parser.add_argument("--top", type=int, default=10)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[str]:
    from pretrain.dry_run import vocab_size
    from pretrain.recipe import load_recipe
    from pretrain.step_time import GPUS

    if args.gpu not in GPUS:
        raise UserError(f"--gpu must be one of {' | '.join(GPUS)}, got '{args.gpu}'")
    for flag, value in (("--gpus", args.gpus), ("--gpu-memory-gib", args.gpu_memory_gib), ("--top", args.top)):
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value:g}")
    recipe = load_recipe(args.recipe, args.overrides)
    gpu, vocab = GPUS[args.gpu], vocab_size(recipe)
    ordered = candidates(recipe, args.gpus, gpu, vocab)
    if not ordered:
        raise UserError(no_layout(recipe, args.gpus, gpu.gpus_per_node))
    found, tried = fitting(ordered, int(args.gpu_memory_gib * 2**30), args.top)
    head = (
        f"{recipe.source} on {args.gpus} x {args.gpu} ({args.gpu_memory_gib:g} GiB): {len(ordered)} layouts x "
        f"recompute settings, fastest first by the analytic step time; {tried} estimated for memory"
    )
    if not found:
        return [head, f"none fits in {args.gpu_memory_gib:g} GiB: more GPUs, or a smaller micro-batch or model"]
    best = found[0]
    return [
        head,
        *table(found, gpu, args.gpus),
        "best as recipe overrides:",
        "  " + as_overrides(best.overrides),
        *chinchilla(best.setup.recipe, vocab, best),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        print("\n".join(run(args)))
        return 0

    return run_tool(body, debug=False)


if __name__ == "__main__":
    sys.exit(main())
