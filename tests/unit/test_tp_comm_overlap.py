"""parallel.tp_comm_overlap (parallel/tp_overlap.py): the key, its one-line refusals, megatron-core's
TransformerConfig field, and the planner's chunked tensor-parallel term (planning/step_time.py).
TE's userbuffers themselves need GPUs: benchmarks/gpu_check.py runs them when a GPU is lent.

Negative control (by hand, 2026-12-07): with tp_overlap_exposed returning 6 x collective whatever
the flag, test_overlap_hides_the_chunked_collectives fails (equal terms), and with the
transformer_config_fields entry removed test_the_key_sets_transformer_config fails."""

import dataclasses
import sys

import pytest
import torch

from benchmarks import gpu_check
from common.errors import RecipeError
from model.gpt import ModelBuild, transformer_config
from parallel import tp_overlap
from parallel.layout import Layout
from planning.gpus import GPUS
from planning.memory import setup_for
from planning.search import candidates
from planning.step_time import step_time, tp_overlap_exposed
from pretrain.recipe import load_recipe

ON = ["parallel.tp_comm_overlap=true"]


def test_the_key_sets_transformer_config():
    recipe = load_recipe("llama70b", ON)
    layout = Layout.from_config(recipe.parallel, 512)
    assert layout.transformer_config_fields()["tp_comm_overlap"] is True
    small = dataclasses.replace(recipe.model, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8)
    assert transformer_config(small, ModelBuild(layout=layout, perform_initialization=False)).tp_comm_overlap
    off = Layout.from_config(load_recipe("llama70b").parallel, 512)
    assert off.transformer_config_fields()["tp_comm_overlap"] is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.sequence_parallel=false"],
            "parallel.tp_comm_overlap = true overlaps the sequence-parallel all-gathers and reduce-scatters: "
            "set parallel.sequence_parallel = true (and parallel.tensor > 1)",
        ),
        (
            ["model.transformer_impl=local"],
            "parallel.tp_comm_overlap = true runs on transformer-engine's userbuffers: set "
            "model.transformer_impl = transformer_engine (got local)",
        ),
    ],
)
def test_recipe_refusals_are_one_line(overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("llama70b", [*ON, *overrides])
    assert str(err.value) == message


def test_runtime_refusals_are_one_line():
    with pytest.raises(RecipeError) as err:
        tp_overlap.check_runtime(torch.device("cpu"))
    assert str(err.value) == (
        "parallel.tp_comm_overlap = true needs CUDA GPUs (transformer-engine userbuffers), this run is on cpu: "
        "set parallel.tp_comm_overlap = false"
    )
    with pytest.raises(RecipeError) as err:  # a CUDA device object needs no GPU; transformer-engine is absent here
        tp_overlap.check_runtime(torch.device("cuda", 0))
    assert str(err.value).startswith("parallel.tp_comm_overlap = true needs transformer-engine, which is not installed")
    assert tp_overlap.userbuffer_shape(8192, 2, 2, 8192) == [8192, 8192]  # Megatron-LM's [s·b/cp, h]


def test_overlap_hides_the_chunked_collectives():
    """Per layer the 6 non-bulk collectives: all exposed without the flag; with it, the ring exchange
    over 8 NVLink ranks hides behind Llama-70B's GEMMs and what is left is the pipelined
    reduce-scatters' last splits and the SMs userbuffers take from the GEMMs beside them."""
    gpu = GPUS["h100"]
    overrides = ["parallel.context=1", "parallel.virtual_pipeline=null", "parallel.pipeline=10"]
    off = setup_for(load_recipe("llama70b", overrides), 80, None, 128256)
    on = setup_for(load_recipe("llama70b", [*overrides, *ON]), 80, None, 128256)
    collective = 8192 * 8192 * 2 * 7 / 8 / (gpu.nvlink_gbs * 1e9)
    assert tp_overlap_exposed(off, gpu, collective, False, False) == 6 * collective
    exposed = tp_overlap_exposed(on, gpu, collective, False, False)
    assert 2 * collective / 4 < exposed < 6 * collective  # at least the 2 last reduce-scatter splits
    slow, fast = step_time(off, gpu), step_time(on, gpu)
    assert fast.tensor < slow.tensor and fast.total < slow.total  # the bubble carries its share too
    assert {t.name: t.seconds for t in fast.terms}["tensor"] == {t.name: t.seconds for t in slow.terms}["tensor"]


def test_gpu_check_row_runs_both_under_torchrun_or_says_why_not(tmp_path):
    """The GPU row (benchmarks/gpu_check.py): TP 2 with and without userbuffers on two GPUs; on this
    CPU machine without transformer-engine both are skipped with the reason."""
    plain, overlapped = gpu_check._tp_overlap_checks(tmp_path, "corpus", smoke=False)
    assert plain.skip == overlapped.skip == "transformer-engine is not installed"
    assert overlapped.command[2:6] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert (
        "parallel.tp_comm_overlap=true" in overlapped.command and "parallel.tp_comm_overlap=true" not in plain.command
    )
    assert "parallel.sequence_parallel=true" in plain.command


def test_search_tries_userbuffers_where_they_apply():
    """Every transformer-engine layout with sequence parallelism is scored with and without
    userbuffers (the same memory setup), each ranked by its own step time (at tiny_gpt's shapes
    some are faster with them, some slower: their SMs cost more than short GEMMs hide); local
    layers never get them."""
    gpu = GPUS["h100"]
    te = load_recipe("tiny_gpt", ["model.transformer_impl=transformer_engine"])
    found = candidates(te, 4, gpu, 512)
    overlapped = [c for c in found if c.overrides.get("parallel.tp_comm_overlap")]
    assert overlapped and all(c.overrides["parallel.sequence_parallel"] for c in overlapped)
    plain = {tuple(sorted(c.overrides.items())): c for c in found if "parallel.tp_comm_overlap" not in c.overrides}
    for c in overlapped:
        twin = plain[tuple(sorted((k, v) for k, v in c.overrides.items() if k != "parallel.tp_comm_overlap"))]
        assert dataclasses.replace(twin.setup.layout, tp_comm_overlap=True) == c.setup.layout
        assert c.time.tensor != twin.time.tensor
        assert (c.time.total < twin.time.total) == (found.index(c) < found.index(twin))
    assert len(found) == len(plain) + len(overlapped)
    local = candidates(load_recipe("tiny_gpt", ["model.transformer_impl=local"]), 4, gpu, 512)
    assert not any("parallel.tp_comm_overlap" in c.overrides for c in local)
