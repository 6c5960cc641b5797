"""The planner (planning/search.py, tools/plan_layout.py) and its step-time model (planning/step_time.py): every layout it
lists fits and is valid, the list is fastest first, memory really filters (faster layouts that do not
fit are left out), the pipeline bubble and recompute cost what the model says, Chinchilla's numbers."""

import argparse
import re

import pytest

from common.errors import UserError
from planning import search
from planning.gpus import GPUS
from planning.memory import Target, setup_for
from planning.setup import validate_for_world
from planning.step_time import step_time
from pretrain.recipe import load_recipe
from tools import plan_layout

GIB = 2**30
LLAMA_VOCAB = 128256


@pytest.fixture(scope="module")
def llama_64():
    recipe = load_recipe("llama70b", ["train.global_batch_size=256"])
    ordered = search.candidates(recipe, 64, GPUS["h100"], LLAMA_VOCAB)
    found, tried = search.fitting(ordered, 80 * GIB, 10)
    return recipe, ordered, found, tried


def test_listed_layouts_fit_are_valid_and_fastest_first(llama_64):
    recipe, ordered, found, _ = llama_64
    assert len(found) == 10
    assert [c.time.total for c in found] == sorted(c.time.total for c in found)
    for c in found:
        assert c.needed <= 80 * GIB
        validate_for_world(c.setup.recipe, 64)  # raises for a layout the run would refuse


def test_memory_filters_faster_layouts_out(llama_64):
    _, ordered, found, tried = llama_64
    # more candidates were estimated than listed: the faster ones in between did not fit
    assert tried > len(found)
    rejected = [c for c in ordered[:tried] if c not in found]
    assert rejected and rejected[0].time.total <= found[-1].time.total


def test_pipeline_bubble_in_step_time():
    """1F1B idles (pp - 1)/vpp micro-batches, each with its exposed communication: interleaving
    shrinks the bubble, not the work."""

    def times(*overrides):
        recipe = load_recipe("llama70b", ["train.global_batch_size=64", *overrides])
        setup = setup_for(recipe, 64, Target(), LLAMA_VOCAB)
        time = step_time(setup, GPUS["h100"])
        bubble = {t.name: t.exposed for t in time.terms}["bubble"]
        return bubble, time.compute - bubble, time, setup.micro_batches

    base = ("parallel.tensor=8", "parallel.pipeline=8", "parallel.context=1")
    plain, work, time, m = times(*base, "parallel.virtual_pipeline=null")
    interleaved, interleaved_work, _, _ = times(*base, "parallel.virtual_pipeline=5")
    assert plain / interleaved == pytest.approx(5)
    assert work == pytest.approx(interleaved_work)
    assert time.tensor > 0
    assert plain == pytest.approx(7 * (work + time.tensor + time.context + time.expert) / m)


def test_recompute_costs_its_extra_forward():
    base = ["parallel.tensor=8", "parallel.pipeline=8", "parallel.context=1", "parallel.virtual_pipeline=null"]
    full = ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"]

    def compute(*overrides):
        recipe = load_recipe("llama70b", [*base, *overrides])
        return step_time(setup_for(recipe, 64, Target(), LLAMA_VOCAB), GPUS["h100"]).compute

    # a full recompute reruns every layer's forward: 4 passes of the layers instead of 3 (the head is not rerun)
    assert 1.25 < compute(*full) / compute() < 1.34


def test_chinchilla_back_of_envelope(llama_64):
    recipe, _, found, _ = llama_64
    (line,) = search.chinchilla(recipe, LLAMA_VOCAB, found[0])
    tokens = 20 * 70_553_706_496
    steps = -(-tokens // (256 * 8192))
    assert f"70.55B parameters -> {tokens / 1e12:.2f}T tokens = {steps:,} steps of 256 x 8192 tokens" in line
    assert f"{steps * found[0].time.total / 86400:.1f} days" in line


def test_bad_arguments_are_one_line_errors():
    args = argparse.Namespace(recipe="tiny_gpt", overrides=[], gpus=8, gpu_memory_gib=80.0, gpu="v100", top=10)
    with pytest.raises(
        UserError, match=re.escape("--gpu must be one of a100 | h100 | h200 | b200 | gb200, got 'v100'")
    ):
        plan_layout.run(args)
    with pytest.raises(UserError, match=re.escape("--gpus must be positive, got 0")):
        plan_layout.run(argparse.Namespace(**{**vars(args), "gpu": "h100", "gpus": 0}))
