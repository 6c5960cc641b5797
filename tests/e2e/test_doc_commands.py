"""Every `pretrain_gpt.py --recipe R ...` command README.md and docs/*.md show is valid as written:
its recipe and overrides load and its layout fits the world size the command gives (torchrun's
--nnodes × --nproc_per_node, or --world-size), checked as the run checks them, without building a
model. Before: docs/fsdp.md showed tiny_moe at tensor 2 without sequence parallelism and llama_3b
under FSDP with its distributed optimizer, both refused at once."""

import re
import shlex

import pytest

from tests.helpers.runs import REPO

PLACEHOLDERS = {"NAME_OR_PATH", "R", "RECIPE"}
SHOWN_FAILING = "bogus.key=1"  # docs/benchmarks.md times the unknown-key error
_COMMAND = re.compile(r"(?:torchrun (?P<launch>[^`#]*?)|python )pretrain_gpt\.py (?P<args>--recipe [^`#|]*)")


def _commands() -> list[tuple[str, str, int, list[str]]]:
    """(where, recipe, world size, overrides) of each command shown."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        for number, line in enumerate(text.splitlines(), 1):
            match = _COMMAND.search(line)
            if match is None:
                continue
            args = shlex.split(match["args"])
            flags = dict(re.findall(r"--(nnodes|nproc_per_node)=(\d+)", match["launch"] or ""))
            world = int(flags.get("nnodes", 1)) * int(flags.get("nproc_per_node", 1))
            if "--world-size" in args:
                world = int(args[args.index("--world-size") + 1])
            if args[1] not in PLACEHOLDERS and SHOWN_FAILING not in args:
                where = f"{path.relative_to(REPO)}:{number}"
                found.append((where, args[1], world, [a for a in args[2:] if "=" in a and not a.startswith("-")]))
    return found


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 25, COMMANDS  # the pattern still finds them


@pytest.mark.parametrize("where, recipe, world, overrides", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_is_valid(where, recipe, world, overrides):
    from planning.setup import validate_for_world
    from pretrain.recipe import load_recipe

    validate_for_world(load_recipe(recipe, overrides), world)
