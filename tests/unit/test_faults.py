"""pretrain/faults.py: each `debug` fault fires at its step only (and the NaN gradient on rank 0 only);
with nothing set the hook hands the step its own forward step and changes nothing. That the guards
catch them in training is tests/e2e/test_guards.py's."""

import time
import types

import pytest
import torch

from common.errors import RecipeError
from pretrain.faults import DebugConfig, FaultInjection, check_debug_for_world
from pretrain.recipe import load_recipe


def _forward_step(data_iterator, model):
    def loss(output):
        return output.sum(), torch.tensor(2), {"lm loss": torch.stack([output.sum(), torch.tensor(2.0)])}

    return torch.ones(2), loss


def _chunks():
    buffer = types.SimpleNamespace(grad_data=torch.zeros(3))
    return [types.SimpleNamespace(buffers=[buffer], expert_parallel_buffers=[])]


def _run(faults: FaultInjection, step: int) -> tuple[float, tuple, torch.Tensor]:
    chunks = _chunks()
    start = time.perf_counter()
    with faults.around(step, chunks, _forward_step) as forward:
        waited = time.perf_counter() - start
        output, loss = forward(None, None)
    return waited, loss(output), chunks[0].buffers[0].grad_data


def test_nothing_set_changes_nothing():
    faults = FaultInjection(DebugConfig(), rank=0)
    with faults.around(0, _chunks(), _forward_step) as forward:
        assert forward is _forward_step
    assert faults.save_pause_s(1) == 0.0 and faults.save_write_delay_s == 0.0


def test_each_fault_fires_at_its_step_only():
    cfg = DebugConfig(nan_loss_at_step=2, nan_grad_at_step=3, stall_at_step=4, stall_s=0.2, save_pause_at_step=5)
    cfg.save_pause_s = 1.5
    faults = FaultInjection(cfg, rank=0)
    for step in range(5):  # 0-based: debug keys name 1-based steps
        waited, (loss, tokens, reports), grads = _run(faults, step)
        assert (waited >= 0.2) == (step == 3)
        assert torch.isnan(loss).item() == (step == 1) and torch.isnan(reports["lm loss"][0]).item() == (step == 1)
        assert tokens.item() == 2 and reports["lm loss"][1].item() == 2.0  # the token count stays whole
        assert torch.isnan(grads[0]).item() == (step == 2) and not torch.isnan(grads[1:]).any()
    assert [faults.save_pause_s(s) for s in (4, 5, 6)] == [0.0, 1.5, 0.0]
    assert torch.isfinite(_run(FaultInjection(cfg, rank=1), 2)[2]).all()  # rank 0's gradient only


def test_hang_injection_needs_the_watchdog():
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny_gpt", ["debug.hang_at_step=3"])
    assert str(e.value) == (
        "debug.hang_at_step needs train.watchdog_timeout_s > 0: the watchdog's record of the collectives is "
        "where a rank skips one, and what reports the hang"
    )


@pytest.mark.parametrize("key", ["hang", "oom"])
def test_injected_rank_must_be_in_the_world(key):
    recipe = load_recipe("tiny_gpt", [f"debug.{key}_at_step=3", f"debug.{key}_rank=4", "train.watchdog_timeout_s=5"])
    with pytest.raises(RecipeError) as e:
        check_debug_for_world(recipe.debug, 4)
    assert str(e.value) == f"debug.{key}_rank = 4 is not a rank of a world of 4"
