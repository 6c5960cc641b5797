"""The shape of the tree, computed from the source (docs/architecture.md): no import circle among
the project's modules, every arrow between folders points down the layers, no module over 450
lines, no function over 80, no block of six lines copied between production modules.

Each rule is also run on a small made-up tree that breaks it, so a checker that stopped seeing
violations would fail here too."""

from __future__ import annotations

import ast
import collections
import pathlib
import subprocess
import sys

from tests.helpers.runs import REPO

# Lower layers first; a folder imports only folders before it (and itself). tools/ and benchmarks/
# are entry points: nothing imports them.
LAYERS = ["common", "upstream", "parallel", "model", "data", "planning", "pretrain", "tools", "benchmarks"]
ENTRY_POINTS = {"tools", "benchmarks"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
COPIED_LINES = 6


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_sources(root: pathlib.Path = REPO) -> dict[str, str]:
    """Module name -> source text of every production module (tests are not part of the layers)."""
    files = [p for layer in LAYERS for p in sorted((root / layer).rglob("*.py"))] + [root / "pretrain_gpt.py"]
    return {_module_name(p, root): p.read_text() for p in files}


def _type_checking_only(parents: list[ast.AST]) -> bool:
    return any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) for p in parents)


def _targets(node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = []
    for name in names:
        while name and name not in modules:  # `import a.b.c` where a.b is the module
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph(sources: dict[str, str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(every import, the imports outside `if TYPE_CHECKING:`) between the modules of `sources`;
    imports inside functions count too."""
    modules = set(sources)
    every: dict[str, set[str]] = collections.defaultdict(set)
    run_time: dict[str, set[str]] = collections.defaultdict(set)
    for name, text in sources.items():
        stack: list[tuple[ast.AST, list[ast.AST]]] = [(ast.parse(text), [])]
        while stack:
            node, parents = stack.pop()
            stack.extend((child, [*parents, node]) for child in ast.iter_child_nodes(node))
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                for target in _targets(node, modules):
                    if target != name:
                        every[name].add(target)
                        if not _type_checking_only(parents):
                            run_time[name].add(target)
    return every, run_time


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a folder into one at or above it in LAYERS (or into an entry-point folder)."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for module, targets in sorted(graph.items()):
        here = module.split(".")[0]
        for target in sorted(targets):
            there = target.split(".")[0]
            if here == there or here not in rank:  # pretrain_gpt.py, the root entry, may import anything
                continue
            if there in ENTRY_POINTS or rank[there] > rank[here]:
                bad.append(f"{module} -> {target}")
    return bad


def oversized(sources: dict[str, str]) -> list[str]:
    bad = []
    for module, text in sorted(sources.items()):
        if len(text.splitlines()) > MAX_MODULE_LINES:
            bad.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    bad.append(f"{module}.{node.name}: {length} lines")
    return bad


def copied_blocks(sources: dict[str, str]) -> list[str]:
    """Runs of COPIED_LINES code lines (stripped; blank, comment, bracket-only and import lines
    skipped) that occur in two modules."""
    trivial = {")", "]", "}", "),", "],", "else:", "try:", "return", '"""'}
    where: dict[tuple[str, ...], set[str]] = collections.defaultdict(set)
    for module, text in sources.items():
        lines = [s for s in (line.strip() for line in text.splitlines()) if s and s not in trivial]
        lines = [s for s in lines if not s.startswith(("#", "import ", "from "))]
        for i in range(len(lines) - COPIED_LINES + 1):
            where[tuple(lines[i : i + COPIED_LINES])].add(module)
    return sorted(f"{sorted(modules)}: {block[0]} ..." for block, modules in where.items() if len(modules) > 1)


SOURCES = project_sources()
EVERY, RUN_TIME = import_graph(SOURCES)


def test_no_import_circle():
    """Type-only imports count: a circle through them still forces imports into functions."""
    assert circles(EVERY) == []


def test_arrows_point_down_the_layers():
    """planning/ names pretrain.recipe.Recipe for the type checker only (`if TYPE_CHECKING:`): it reads
    the recipe's sections at run time and never imports pretrain/."""
    assert upward_arrows(RUN_TIME) == []


def test_no_module_or_function_too_long():
    assert oversized(SOURCES) == []


def test_no_block_copied_between_modules():
    assert copied_blocks(SOURCES) == []


def test_loading_a_recipe_imports_no_torch():
    """A bad recipe fails in a fraction of a second: the sections' modules (faults, checkpoint
    config, ...) keep torch out of their imports."""
    code = "import sys; from pretrain.recipe import load_recipe; load_recipe('tiny_gpt'); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_the_checks_see_what_breaks_them():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    block = "".join(f"v{i} = f({i})\n" for i in range(COPIED_LINES))
    made_up = {
        "model.a": "from model import b\n",
        "model.b": "import model.a\nfrom pretrain.trainer import train\n",
        "data.c": "def f():\n    from tools.x import y\n",
        "planning.d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pretrain import trainer\n",
        "pretrain.trainer": f"def train():\n{body}\n" + block,
        "tools.x": block,
    }
    every, run_time = import_graph(made_up)
    assert circles(every) == [["model.a", "model.b"]]
    assert upward_arrows(run_time) == ["data.c -> tools.x", "model.b -> pretrain.trainer"]
    assert upward_arrows(every)[-1] == "planning.d -> pretrain.trainer"
    assert oversized({"pretrain.trainer": made_up["pretrain.trainer"]}) == ["pretrain.trainer.train: 81 lines"]
    assert oversized({"m": "\n" * MAX_MODULE_LINES + "x = 1\n"}) == ["m: 451 lines"]
    assert copied_blocks(made_up) == [f"['pretrain.trainer', 'tools.x']: {block.splitlines()[0]} ..."]
