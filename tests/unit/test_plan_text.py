"""The planner's output for people (planning/search.py, planning/report.py): the layout table's columns
as wide as their longest entry."""

import dataclasses

from planning import search
from planning.gpus import GPUS
from planning.report import aligned
from pretrain.recipe import load_recipe

A100_FP8 = (
    "fp8.enabled = true: a100 has no FP8 tensor cores; set fp8.enabled = false or plan for "
    "--gpu h100 | h200 | b200 | gb200"
)
FP8 = ["fp8.enabled=true", "train.precision=bf16", "train.global_batch_size=8"]


def test_aligned_columns_fit_their_longest_cell():
    rows = [["#", "recompute", "step s"], ["1", "none", "1.73"], ["12", "selective layernorm,moe_act", "0.0000203"]]
    assert aligned(rows, left=frozenset({1})) == [
        "   #  recompute                       step s",
        "   1  none                              1.73",
        "  12  selective layernorm,moe_act  0.0000203",
    ]


def test_layout_table_lines_up_long_entries():
    """Rows with wider entries than the headers (a long recompute list, a wide data column) stay in
    their columns: every right-aligned cell ends where its header ends, recompute starts where its header does."""
    recipe = load_recipe("tiny_gpt", ["train.global_batch_size=8"])
    first = search.candidates(recipe, 2, GPUS["h100"], 256)[0]
    long = first.overrides | {
        "model.recompute_granularity": "selective",
        "model.recompute_modules": ["layernorm", "moe_act", "mlp"],
        "parallel.fsdp": "zero3",
        "parallel.fsdp_shard_size": 16,
    }
    found = [dataclasses.replace(first, needed=2**30), dataclasses.replace(first, overrides=long, needed=2**40)]
    head, *rows = search.table(found, GPUS["h100"], 2)
    assert "selective layernorm,moe_act,mlp" in rows[1] and "1 z3/16" in rows[1]
    start = head.index("recompute")
    assert {row[start:].split("  ")[0].strip() for row in rows} == {"none", "selective layernorm,moe_act,mlp"}
    ends = [head.index(name) + len(name) for name in search.TABLE_HEAD if name != "recompute"]
    for row in rows:
        assert all(row[end - 1] != " " and (end == len(row) or row[end] == " ") for end in ends), row
