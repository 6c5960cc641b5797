"""The layout planner: `python -m tools.plan_layout --recipe R --gpus N [--gpu h100] [--gpu-memory-gib G]`
lists the layouts (tensor, pipeline, virtual, context, expert, data, recompute, micro-batch) whose
worst rank fits, fastest first by the analytic step time (planning/step_time.py), and prints the best
as recipe overrides, with a Chinchilla back-of-envelope for the recipe's model (planning/search.py)."""

from __future__ import annotations

import argparse
import sys

from common.errors import UserError, run_tool
from planning import search
from planning.gpus import GPUS
from planning.setup import vocab_size
from pretrain.recipe import load_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.plan_layout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value, applied before planning")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="memory per GPU (default: the --gpu's own, as --dry-run --gpu)",
    )
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    parser.add_argument("--top", type=int, default=10)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[str]:
    if args.gpu not in GPUS:
        raise UserError(f"--gpu must be one of {' | '.join(GPUS)}, got '{args.gpu}'")
    if args.gpu_memory_gib is None:
        args.gpu_memory_gib = GPUS[args.gpu].memory_gib
    for flag, value in (("--gpus", args.gpus), ("--gpu-memory-gib", args.gpu_memory_gib), ("--top", args.top)):
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value:g}")
    recipe = load_recipe(args.recipe, args.overrides)
    gpu, vocab = GPUS[args.gpu], vocab_size(recipe)
    ordered = search.candidates(recipe, args.gpus, gpu, vocab)
    if not ordered:
        raise UserError(search.no_layout(recipe, args.gpus, gpu.gpus_per_node))
    found, tried = search.fitting(ordered, int(args.gpu_memory_gib * 2**30), args.top)
    head = (
        f"{recipe.source} on {args.gpus} x {args.gpu} ({args.gpu_memory_gib:g} GiB): {len(ordered)} layouts x "
        f"recompute settings, fastest first by the analytic step time; {tried} estimated for memory"
    )
    if not found:
        return [head, f"none fits in {args.gpu_memory_gib:g} GiB: more GPUs, or a smaller micro-batch or model"]
    best = found[0]
    return [
        head,
        *search.table(found, gpu, args.gpus),
        "best as recipe overrides:",
        "  " + search.as_overrides(best.overrides),
        *search.chinchilla(best.setup.recipe, vocab, best),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        print("\n".join(run(args)))
        return 0

    return run_tool(body, debug=False)


if __name__ == "__main__":
    sys.exit(main())
