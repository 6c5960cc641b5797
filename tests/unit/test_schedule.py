"""The LR schedule each recipe `optimizer.decay` gives, stepped as the trainer steps it."""

import math
import types

import pytest

from pretrain.optim import build_scheduler
from pretrain.recipe import load_recipe


def _lrs(overrides, steps):
    recipe = load_recipe("tiny_gpt", overrides)
    optimizer = types.SimpleNamespace(param_groups=[{"lr": 0.0, "weight_decay": 0.0}])
    scheduler = build_scheduler(recipe.optimizer, recipe.train.steps, optimizer)
    lrs = []
    for _ in range(steps):
        scheduler.step(increment=1)  # as train_step: step k trains with lr(k)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


BASE = ["optimizer.lr=1.0", "optimizer.min_lr=0.1", "optimizer.warmup_steps=4", "optimizer.decay_steps=10"]


def test_warmup_is_linear_from_lr_over_warmup():
    assert _lrs(BASE, 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_reaches_min_lr_at_the_end_of_decay():
    lrs = _lrs(BASE + ["optimizer.decay=cosine"], 16)
    assert lrs[4 + 5 - 1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lrs[13] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


def test_linear_decay():
    lrs = _lrs(BASE + ["optimizer.decay=linear"], 14)
    assert lrs[4 + 5 - 1] == pytest.approx(1.0 - 0.9 * 0.5)


def test_wsd_holds_then_decays_over_its_last_steps():
    lrs = _lrs(BASE + ["optimizer.decay=wsd", "optimizer.wsd_decay_steps=2"], 14)
    assert lrs[4:12] == pytest.approx([1.0] * 8)
    assert lrs[13] == pytest.approx(0.1)


def test_constant_after_warmup():
    assert _lrs(BASE + ["optimizer.decay=constant"], 8)[4:] == pytest.approx([1.0] * 4)
