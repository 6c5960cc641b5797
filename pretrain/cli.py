"""Command line of pretrain_gpt.py: parse, validate, print the recipe, dry-run or train; user errors exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from common.errors import EXIT_INTERRUPTED, RecipeError, RunStopped, UserError, run_tool
from planning.gpus import GPUS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="Pretrain a GPT from a recipe: torchrun --nproc_per_node=N pretrain_gpt.py "
        "--recipe NAME_OR_PATH [key.path=value ...]",
    )
    parser.add_argument("--recipe", required=True, help="recipes/NAME(.yaml) or a path to a YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=60")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate for the world size, print layout and parameter counts, exit"
    )
    parser.add_argument(
        "--world-size", type=int, default=None, help="world size for --dry-run (default: WORLD_SIZE or 1)"
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="with --dry-run: say whether the worst rank fits in this much GPU memory, and if not, the "
        "cheapest recompute setting that would",
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="with --dry-run: processes per node, for parallel.fsdp_shard_size = node (default: LOCAL_WORLD_SIZE)",
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the report as one JSON object")
    parser.add_argument(
        "--gpu",
        default=None,
        help=f"with --dry-run: {' | '.join(GPUS)}: memory on that GPU (its own size unless "
        "--gpu-memory-gib) and the analytic step time of the recipe's layout (docs/planner.md)",
    )
    parser.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the resolved recipe (every key, defaults included) as YAML, exit",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from pretrain.recipe import dump_recipe, load_recipe

    _check_dry_run_flags(args)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(dump_recipe(recipe), end="")
        return 0
    # After the recipe is checked (a bad one fails in a fraction of a second, without torch), before
    # anything imports megatron-core (upstream/process.py): a bad recipe fails before torch loads.
    from upstream.process import prepare_process

    prepare_process(quiet=not args.debug)
    if args.dry_run:
        return _dry_run(args, recipe)
    from parallel.layout import shutdown
    from pretrain.trainer import train

    try:
        record = train(recipe)
    except RecipeError as exc:
        if "WORLD_SIZE" in os.environ:
            raise
        hint = "a plain `python` run is 1 process: launch the planned number with torchrun, or check it with --dry-run --world-size N"
        raise _with_world_hint(exc, hint) from None
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        if "loss" in record:
            print(f"final loss {record['loss']:.4f} after {record['step']} steps", flush=True)
        else:
            print(
                f"nothing to train: the run is at step {record['step']}, train.steps = {recipe.train.steps}", flush=True
            )
    return 0


def _dry_run(args: argparse.Namespace, recipe: Any) -> int:
    from planning.dry_run import dry_run

    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    per_node = args.gpus_per_node or (int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None)
    try:
        print(dry_run(recipe, world_size, args.gpu_memory_gib, args.json, args.gpu, per_node))
    except RecipeError as exc:
        if args.world_size is not None:
            raise
        hint = "--dry-run plans for WORLD_SIZE or 1 process: give the planned size with --world-size N"
        raise _with_world_hint(exc, hint) from None
    return 0


def _with_world_hint(exc: RecipeError, hint: str) -> RecipeError:
    """A layout that does not fit a world size nobody gave (a plain run, a dry run without
    --world-size) says where that size came from."""
    return RecipeError(f"{exc} ({hint})") if "world size" in str(exc) else exc


def _check_dry_run_flags(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--gpu-memory-gib", args.gpu_memory_gib),
        ("--json", args.json or None),
        ("--gpu", args.gpu),
        ("--gpus-per-node", args.gpus_per_node),
    ):
        if value is not None and not args.dry_run:
            raise UserError(f"{flag} is a --dry-run option: add --dry-run")
    if args.gpu is not None and args.gpu not in GPUS:
        raise UserError(f"--gpu must be one of {' | '.join(GPUS)}, got '{args.gpu}'")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise UserError(f"--gpu-memory-gib must be positive, got {args.gpu_memory_gib:g}")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be positive, got {args.gpus_per_node}")
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size must be positive, got {args.world_size}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK")
    return run_tool(lambda: _run_until_stopped(args), args.debug, f"[rank {rank}] " if rank not in (None, "0") else "")


def _run_until_stopped(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except RunStopped as e:
        # Every rank stops at the same step for the same reason: rank 0 says it once (a stop only
        # one rank knows of, e.g. out of memory, is said by that rank).
        if int(os.environ.get("RANK", "0")) == 0 or getattr(e, "every_rank", False):
            print(f"{e.label}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (start-up, teardown), where nothing is left to save.
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"interrupted: Ctrl-C outside the training steps, stopped at once (exit code {EXIT_INTERRUPTED})",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_INTERRUPTED
