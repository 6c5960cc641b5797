"""Command line of pretrain_gpt.py: parse, validate, print the recipe, dry-run or train; user errors exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from common.errors import EXIT_USER_ERROR, RunStopped, UserError, path_problem


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
        "--print-recipe",
        action="store_true",
        help="print the resolved recipe (every key, defaults included) as YAML, exit",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from pretrain.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(dump_recipe(recipe), end="")
        return 0
    # After the recipe is checked (a bad one fails in a fraction of a second, without torch), before
    # anything imports megatron-core (upstream/process.py): a bad recipe fails before torch loads.
    from upstream.process import prepare_process

    prepare_process(quiet=not args.debug)
    if args.dry_run:
        from pretrain.dry_run import dry_run

        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run(recipe, world_size))
        return 0
    from parallel.layout import shutdown
    from pretrain.trainer import train

    try:
        record = train(recipe)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        rank = os.environ.get("RANK")
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"error: {where}{e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except OSError as e:
        problem = path_problem(e)
        if problem is None or args.debug:
            raise
        rank = os.environ.get("RANK")
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"error: {where}{problem}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except RunStopped as e:
        # Every rank stops at the same step for the same reason: rank 0 says it once.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{e.label}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
