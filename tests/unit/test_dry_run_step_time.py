"""`pretrain_gpt.py --dry-run --gpu`: the recipe's own layout scored by the planner's step-time model
(planning/step_time.py) and checked against that GPU's memory, in text and in --json."""

import json

import pytest

from planning.dry_run import dry_run
from planning.gpus import GPUS
from planning.memory import Target, setup_for
from planning.setup import vocab_size
from planning.step_time import step_time
from pretrain import cli
from pretrain.recipe import load_recipe

OVERRIDES = ["parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=8"]


@pytest.fixture(scope="module")
def report():
    recipe = load_recipe("tiny_gpt", OVERRIDES)
    return recipe, json.loads(dry_run(recipe, 8, None, True, "h100"))


def test_json_step_time_is_the_planners(report):
    recipe, out = report
    setup = setup_for(recipe, 8, Target.for_device("cuda", recipe.model.transformer_impl), vocab_size(recipe))
    expected = step_time(setup, GPUS["h100"])
    st = out["step_time"]
    assert st["seconds"] == pytest.approx(expected.total, rel=1e-9)
    tokens = recipe.train.global_batch_size * recipe.model.seq_length
    assert st["tokens_per_s_per_gpu"] == pytest.approx(tokens / expected.total / 8, rel=1e-9)
    assert st["tflops_per_gpu"] == pytest.approx(expected.model_flops / expected.total / 8 / 1e12, rel=1e-9)
    # the exposed terms add up to the step
    assert sum(t["exposed"] for t in st["terms"].values()) == pytest.approx(st["seconds"], rel=1e-9)
    assert {"compute", "bubble", "recompute", "tensor", "data_reduce_scatter", "pipeline"} <= set(st["terms"])
    assert all(t["exposed"] <= t["seconds"] + 1e-9 for t in st["terms"].values())


def test_json_memory_fits_on_the_gpus_memory(report):
    _, out = report
    memory = out["memory"]
    assert memory["gpu_memory_gib"] == GPUS["h100"].memory_gib
    assert memory["fits"] is True and memory["device"] == "cuda" and memory["reserve_gib"] > 0


def test_too_little_memory_does_not_fit():
    out = json.loads(dry_run(load_recipe("tiny_gpt", OVERRIDES), 8, 0.001, True, "a100"))
    assert out["memory"]["fits"] is False and out["step_time"]["gpu"] == "a100"


def test_bad_gpu_is_a_one_line_error(capsys):
    assert cli.main(["--recipe", "tiny_gpt", "--dry-run", "--gpu", "v100"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --gpu must be one of a100 | h100 | h200 | b200 | gb200, got 'v100'"
    ]
    assert cli.main(["--recipe", "tiny_gpt", "--gpu", "h100"]) == 2
    assert "--gpu is a --dry-run option: add --dry-run" in capsys.readouterr().err
