"""An FP8 recipe on a GPU without FP8 tensor cores (planning/gpus.py: A100) is refused in one line
wherever a step time is scored (`--dry-run --gpu`, tools.plan_layout, planning/step_time.py), never
scored at the bf16 peak."""

import argparse

import pytest

from common.errors import UserError
from planning.dry_run import dry_run
from planning.gpus import GPUS
from planning.memory import Target, setup_for
from planning.step_time import step_time
from pretrain import cli
from pretrain.recipe import load_recipe
from tools import plan_layout

A100_FP8 = (
    "fp8.enabled = true: a100 has no FP8 tensor cores; set fp8.enabled = false or plan for "
    "--gpu h100 | h200 | b200 | gb200"
)
FP8 = ["fp8.enabled=true", "train.precision=bf16", "train.global_batch_size=8"]


def test_fp8_on_a_gpu_without_fp8_is_refused_everywhere(capsys):
    recipe = load_recipe("tiny_gpt", FP8)
    with pytest.raises(UserError) as error:
        step_time(setup_for(recipe, 1, Target.for_device("cuda", "local"), 256), GPUS["a100"])
    assert str(error.value) == A100_FP8
    assert cli.main(["--recipe", "tiny_gpt", "--dry-run", "--gpu", "a100", *FP8]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {A100_FP8}"]
    assert plan_layout.main(["--recipe", "tiny_gpt", "--gpus", "2", "--gpu", "a100", *FP8]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {A100_FP8}"]
    # the same recipe on a GPU with FP8 tensor cores is scored
    args = argparse.Namespace(recipe="tiny_gpt", overrides=FP8, gpus=2, gpu_memory_gib=None, gpu="h100", top=3)
    assert plan_layout.run(args)[2].startswith("  1  ")
    assert '"gpu": "h100"' in dry_run(recipe, 1, None, True, "h100")
