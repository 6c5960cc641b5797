"""Multi-token prediction in the step time (planning/step_time.py): each MTP module (model/mtp.py)
runs on the last pipeline stage as one more decoder layer, its [2h -> h] projection and its own pass
through the output layer and the loss, forward and backward, every micro-batch.

Negative control (by hand, 2026-12-07): with _stage_times' MTP lines removed the compute terms
with and without MTP are equal and this fails."""

import pytest

from planning.gpus import GPUS
from planning.memory import Target, setup_for
from planning.step_time import _gemm_seconds, step_time
from pretrain.recipe import load_recipe

H100 = GPUS["h100"]


def _compute(*overrides):
    recipe = load_recipe("tiny_gpt", ["train.precision=bf16", *overrides])
    setup = setup_for(recipe, 1, Target.for_device("cuda", "local"), 256)
    return {t.name: t.seconds for t in step_time(setup, H100).terms}["compute"], setup


def test_an_mtp_module_costs_a_layer_a_projection_and_an_output_pass():
    plain, setup = _compute()
    mtp, _ = _compute("model.mtp_num_layers=1")
    one_more_layer, _ = _compute("model.num_layers=5")
    tokens, h, vocab, mb = setup.shape.tokens, setup.model.hidden_size, setup.vocab, setup.micro_batches
    projection = _gemm_seconds(H100, tokens, 2 * h, h, H100.peak("bf16"), 2)
    head = _gemm_seconds(H100, tokens, h, vocab, H100.peak("bf16"), 2)
    loss = tokens * vocab * (2 * 2 + 4 * 4) / (H100.hbm_gbs * 1e9) / 3  # the cross entropy's forward share
    assert mtp - plain == pytest.approx(one_more_layer - plain + 3 * mb * (projection + head + loss))
