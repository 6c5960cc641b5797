"""The `parallel` section (parallel/config.py) and the layout it gives (parallel/layout.py): uneven
pipeline stages, context-parallel communication (ring, Ulysses, a2a+p2p), overlap defaults."""

import re

import pytest

from common.errors import RecipeError
from pretrain.recipe import load_recipe
from tests.helpers.recipes import error_of, in_tmp  # noqa: F401  (in_tmp: autouse, each test runs in tmp_path)

# ----------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.first_stage_layers=1"],
            "parallel.first_stage_layers requires parallel.pipeline > 1, got parallel.pipeline = 1",
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.last_stage_layers=1"],
            "parallel.last_stage_layers cannot be combined with parallel.virtual_pipeline",
        ),
        (
            ["parallel.pipeline=2", "parallel.first_stage_layers=0"],
            "parallel.first_stage_layers must be positive, got 0",
        ),
        (
            ["parallel.pipeline=4", "parallel.first_stage_layers=2"],
            "parallel.first_stage_layers leave 2 of model.num_layers = 4 for 3 other pipeline stage(s): "
            "they must split evenly, at least one layer each",
        ),
        (
            ["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"],
            "parallel.first_stage_layers and parallel.last_stage_layers leave 1 of model.num_layers = 4 for 0 "
            "other pipeline stage(s): they must split evenly, at least one layer each",
        ),
    ],
)
def test_uneven_pipeline_messages(overrides, message):
    assert error_of("tiny_gpt", overrides) == message


def test_uneven_pipeline_split():
    from parallel.config import pipeline_stage_layers

    r = load_recipe(
        "tiny_gpt",
        ["model.num_layers=8", "parallel.pipeline=4", "parallel.first_stage_layers=1", "parallel.last_stage_layers=3"],
    )
    assert pipeline_stage_layers(r.parallel, 8) == [1, 2, 2, 3]
    even = load_recipe("tiny_gpt", ["parallel.pipeline=2"])
    assert pipeline_stage_layers(even.parallel, 4) == [2, 2]


# ------------------------------------------------------------------------------ context parallelism


def test_context_parallel_attention_has_no_dropout():
    ring = "uses ring attention, which has no attention dropout"
    ulysses = "has no attention dropout (its CP ranks would draw one mask stream for different heads)"
    for comm, what in (("p2p", ring), ("a2a", ulysses), ("a2a+p2p", ring)):
        extra = ["parallel.context_a2a=2"] if comm == "a2a+p2p" else []
        overrides = ["parallel.context=4", f"parallel.context_comm={comm}", *extra, "model.attention_dropout=0.1"]
        message = f"parallel.context = 4 with parallel.context_comm = {comm} {what}: set model.attention_dropout = 0 (got 0.1)"
        assert error_of("tiny_gpt", overrides) == message


ULYSSES_SHARE = "gives each of those ranks a share of the"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.context=4", "parallel.context_comm=a2a", "parallel.tensor=2"],
            "parallel.context = 4 does not divide model.num_attention_heads / parallel.tensor = 2 "
            f"(parallel.context_comm = a2a {ULYSSES_SHARE} query heads)",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a", "model.hidden_size=96", "model.num_attention_heads=12"]
            + ["model.num_query_groups=6"],
            "parallel.context = 4 and model.num_query_groups / parallel.tensor = 6 do not divide one another "
            f"(parallel.context_comm = a2a {ULYSSES_SHARE} K/V heads, split or copied)",
        ),
        (
            ["parallel.context=8", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=4", "parallel.tensor=2"],
            "parallel.context_a2a = 4 does not divide model.num_attention_heads / parallel.tensor = 2 "
            f"(parallel.context_comm = a2a+p2p {ULYSSES_SHARE} query heads)",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p"],
            "parallel.context_comm = a2a+p2p needs parallel.context_a2a: the ranks of one all-to-all group, a "
            "divisor of parallel.context = 4",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=3"],
            "parallel.context_a2a = 3 does not divide parallel.context = 4",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=4"],
            "parallel.context_a2a = 4 with parallel.context = 4 leaves a ring of one rank: "
            "set parallel.context_comm = a2a",
        ),
        (
            ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=1"],
            "parallel.context_a2a = 1 with parallel.context = 4 leaves an all-to-all of one rank: "
            "set parallel.context_comm = p2p",
        ),
        (
            ["parallel.context=2", "parallel.context_a2a=2"],
            "parallel.context_a2a = 2 is only read with parallel.context_comm = a2a+p2p, got parallel.context_comm = p2p",
        ),
        (
            ["parallel.context=8", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=4"]
            + ["model.transformer_impl=transformer_engine"],
            "parallel.tensor × parallel.context_a2a = 4 does not divide model.num_query_groups = 2",
        ),
    ],
)
def test_ulysses_messages(overrides, message):
    assert error_of("tiny_gpt", overrides) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.context=2", "parallel.context_comm=a2a"],  # K/V heads split: 2 on 2 ranks
        ["parallel.context=4", "parallel.context_comm=a2a"],  # K/V heads copied: 2 to 4 ranks
        ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2", "parallel.tensor=2"],
    ],
)
def test_ulysses_layouts_of_tiny_gpt_load(overrides):
    load_recipe("tiny_gpt", overrides)


def test_a2a_p2p_layout_names_megatrons_hierarchical_groups():
    from parallel.layout import Layout

    overrides = ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2", "parallel.tensor=2"]
    layout = Layout.from_config(load_recipe("tiny_gpt", overrides).parallel, world_size=8)
    assert layout.hierarchical_context == [2, 2]  # [all-to-all group, ring]
    assert layout.describe() == "world 8 = tensor 2 x pipeline 1 x context 4 (a2a 2 x p2p 2) x data 1; expert 1"
    assert Layout(world_size=2, context=2, context_comm="a2a").hierarchical_context is None
    with pytest.raises(RecipeError, match=re.escape("parallel.context_a2a = 3 does not fit parallel.context_comm")):
        Layout(world_size=4, context=4, context_comm="a2a+p2p", context_a2a=3)


# ------------------------------------------------------------------------------------------ overlap


@pytest.mark.parametrize(
    "overrides, resolved",
    [
        # (grad reduce, param gather, p2p) overlapped: null = on wherever megatron-core has it
        ([], (True, False, False)),
        (["parallel.distributed_optimizer=true"], (True, True, False)),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=2"], (True, False, True)),
        (["parallel.fsdp=zero3"], (False, False, False)),  # FSDP2 overlaps its own
        (
            ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=false"]
            + ["parallel.overlap_param_gather=false"],
            (False, False, False),
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.overlap_p2p_comm=false"],
            (True, False, False),
        ),
    ],
)
def test_overlap_defaults_resolve(overrides, resolved):
    p = load_recipe("tiny_gpt", overrides).parallel
    assert (p.grad_reduce_overlapped, p.param_gather_overlapped, p.p2p_overlapped) == resolved
