"""HSDP (parallel.fsdp_shard_size) in the planner: the memory model shards the state over the shard
group only, the step time puts FSDP's per-micro-batch gathers and reduce-scatters on the shard
group's links and adds one all-reduce of the gradient shards across the groups, and the layout
search proposes it where it is faster (dense models only: the recipe checks refuse it with MoE).

Negative controls (by hand, 2026-12-07): with planning/search.py:_shardings' HSDP line removed,
test_search_proposes_hsdp_over_zero3_for_llama_1b_on_four_nodes finds no HSDP candidate and fails;
with hsdp_replica_seconds returning 0, test_step_time_terms_follow_their_formulas fails; with
state_shards dividing by data × context instead of the shard size, the memory test fails (4x apart)."""

import dataclasses

import pytest

from model.config import check_model
from planning import search
from planning.gpus import GPUS
from planning.memory import Target, estimate_setup, setup_for, stage_parameters
from planning.setup import validate_for_world
from planning.step_time import step_time
from pretrain.recipe import load_recipe

LLAMA3_VOCAB = 128256
FSDP = ["model.transformer_impl=local", "parallel.distributed_optimizer=false"]


def _setup(world, *overrides):
    return setup_for(load_recipe("llama_1b", [*FSDP, *overrides]), world, Target(), LLAMA3_VOCAB)


@pytest.mark.parametrize("fsdp", ["zero3", "zero2"])
def test_state_at_shard_size_8_of_32_is_plain_fsdp_over_8(fsdp):
    """Weights, gradients and optimizer state of 32 ranks in groups of 8 are those of plain FSDP
    over 8 ranks; the gathered weights too (whole units either way)."""
    (hybrid,) = estimate_setup(_setup(32, f"parallel.fsdp={fsdp}", "parallel.fsdp_shard_size=8")).stages
    (eight,) = estimate_setup(_setup(8, f"parallel.fsdp={fsdp}")).stages
    (everywhere,) = estimate_setup(_setup(32, f"parallel.fsdp={fsdp}")).stages
    for term in ("weights", "grads", "optimizer", "gathered"):
        assert getattr(hybrid, term) == getattr(eight, term), term
    assert hybrid.optimizer == 4 * everywhere.optimizer


def test_step_time_terms_follow_their_formulas():
    """llama_1b on 4 nodes of 8 H100s, zero3 in groups of 8: per micro-batch an fp32 reduce-scatter
    and two bf16 all-gathers of the parameters over NVLink, (8-1)/8 on the wire; once a step the
    fp32 gradient shards (1/8) all-reduced across the 4 groups over the network, 2 (4-1)/4 on the
    wire, exposed. Plain zero3 over all 32 puts the same per-micro-batch traffic on the network."""
    h100 = GPUS["h100"]
    setup = _setup(32, "parallel.fsdp=zero3", "parallel.fsdp_shard_size=8")
    params = sum(stage_parameters(setup, 0))
    mb = setup.micro_batches
    terms = {t.name: t for t in step_time(setup, h100).terms}
    assert terms["data_reduce_scatter"].seconds == pytest.approx(mb * 4 * params * 7 / 8 / (h100.nvlink_gbs * 1e9))
    assert terms["data_all_gather"].seconds == pytest.approx(mb * 2 * 2 * params * 7 / 8 / (h100.nvlink_gbs * 1e9))
    all_reduce = 4 * params / 8 * 2 * 3 / 4 / (h100.network_gbs * 1e9)
    assert terms["hsdp_all_reduce"].seconds == pytest.approx(all_reduce)
    assert terms["hsdp_all_reduce"].exposed == pytest.approx(all_reduce)
    plain = {t.name: t for t in step_time(_setup(32, "parallel.fsdp=zero3"), h100).terms}
    assert plain["data_reduce_scatter"].seconds == pytest.approx(mb * 4 * params * 31 / 32 / (h100.network_gbs * 1e9))
    assert plain["hsdp_all_reduce"].seconds == 0.0


def test_search_proposes_hsdp_over_zero3_for_llama_1b_on_four_nodes():
    """Every HSDP candidate shards within one node (8 / tensor data ranks), passes the recipe checks
    and the run's layout validation, and is faster than the same layout under plain FSDP; among
    the layouts that fit, the fastest FSDP one is hybrid."""
    recipe = load_recipe("llama_1b", ["model.transformer_impl=local"])
    ordered = search.candidates(recipe, 32, GPUS["h100"], LLAMA3_VOCAB)
    hybrid = [c for c in ordered if c.overrides["parallel.fsdp_shard_size"] is not None]
    assert hybrid
    plain = {
        _key(c): c.time.total
        for c in ordered
        if c.overrides["parallel.fsdp"] and c.overrides["parallel.fsdp_shard_size"] is None
    }
    for c in hybrid:
        o = c.overrides
        assert o["parallel.fsdp_shard_size"] == 8 // o["parallel.tensor"]
        check_model(c.setup.recipe.model, c.setup.recipe.parallel)
        validate_for_world(c.setup.recipe, 32)
        assert c.time.total < plain[_key(c)]
    found, _ = search.fitting(ordered, int(79.6 * 2**30), 20)
    first_fsdp = next(c for c in found if c.overrides["parallel.fsdp"] is not None)
    assert first_fsdp.overrides["parallel.fsdp_shard_size"] == 8
    row = search.table([first_fsdp], GPUS["h100"], 32)[1]
    assert f"32 {'z3' if first_fsdp.overrides['parallel.fsdp'] == 'zero3' else 'z2'}/8" in row


def _key(c):
    """A candidate's layout but its shard size."""
    return tuple((k, str(v)) for k, v in sorted(c.overrides.items()) if k != "parallel.fsdp_shard_size")


def test_search_never_proposes_hsdp_for_moe():
    """tiny_moe on 4 ranks of 2-GPU nodes (two nodes' worth of data ranks at tensor 1) gets FSDP
    candidates but no shard size: the recipe checks refuse hybrid sharding with experts."""
    recipe = load_recipe("tiny_moe", ["train.global_batch_size=8"])
    assert search._shardings(recipe, 1, 4, 2) == [(None, None), ("zero3", None), ("zero2", None)]
    small_nodes = dataclasses.replace(GPUS["h100"], gpus_per_node=2)
    ordered = search.candidates(recipe, 4, small_nodes, 256)
    assert any(c.overrides["parallel.fsdp"] for c in ordered)
    assert all(c.overrides["parallel.fsdp_shard_size"] is None for c in ordered)
    dense = search.candidates(load_recipe("tiny_gpt", ["train.global_batch_size=8"]), 4, small_nodes, 256)
    assert any(c.overrides["parallel.fsdp_shard_size"] == 2 for c in dense)  # the same world, dense: tried
