"""pretrain/checkpoint/optimizer_state.py: which optimizer kind saved a checkpoint, its Adam step, and where each
kind's checkpoint keeps the fp32 master weights another kind reads (the e2e resumes across kinds are
tests/e2e/test_fsdp_training.py's)."""

import pytest

from common.errors import UserError
from pretrain.checkpoint import optimizer_state as o

# The common (non-tensor) optimizer entries each kind saves, as dist_checkpointing keeps them.
PLAIN = {"param_groups": [{"lr": 1e-3, "params": [0, 1]}], "state": {"common_step": 5}}
HALF = {"optimizer": {"param_groups": [{"lr": 1e-3}], "state": {"common_step": 7}}}
DISTRIBUTED = {
    "optimizer": {"param_groups": [{"lr": 1e-3, "step": 9.0}]},
    "param_state_sharding_type": "fully_reshardable",
}


@pytest.mark.parametrize(
    "common, kind, step",
    [(PLAIN, "plain", 5), (HALF, "half", 7), (DISTRIBUTED, "distributed", 9), ({0: PLAIN, 1: PLAIN}, "plain", 5)],
    ids=["plain", "half", "distributed", "chained"],
)
def test_saved_kind_and_step(common, kind, step):
    assert o.saved_kind(common) == kind
    assert o.saved_step(common) == step


KEY = "decoder.layers.mlp.linear_fc1.weight"


@pytest.mark.parametrize(
    "key, kind, saved, wanted",
    [
        # masters the current kind keeps in its optimizer state, read from the plain kind's model entries
        (f"optimizer.state.param.{KEY}", "distributed", "plain", KEY),
        (f"chained_1.optimizer.state.fp32_param.{KEY}", "half", "plain", KEY),
        (f"optimizer.state.param.{KEY}", "distributed", "half", f"optimizer.state.fp32_param.{KEY}"),
        (f"optimizer.state.fp32_param.{KEY}", "half", "distributed", f"optimizer.state.param.{KEY}"),
        # the plain kind's model entries are its masters: read them where the saving kind kept masters
        (KEY, "plain", "distributed", f"optimizer.state.param.{KEY}"),
        (KEY, "plain", "half", f"optimizer.state.fp32_param.{KEY}"),
        # moments have one key in every kind; other kinds' model entries are not masters
        (f"optimizer.state.exp_avg.{KEY}", "plain", "distributed", None),
        (KEY, "distributed", "plain", None),
        (KEY, "plain", "plain", None),
    ],
)
def test_master_key_of_each_kind(key, kind, saved, wanted):
    assert o._master_key(key, kind, saved) == wanted


def test_pick_finds_the_chained_optimizer_that_held_a_parameter():
    available = {f"chained_1.optimizer.state.param.{KEY}", KEY}
    assert o._pick(f"optimizer.state.param.{KEY}", available, KEY) == f"chained_1.optimizer.state.param.{KEY}"
    assert o._pick(None, available, KEY) == KEY
    assert o._pick(f"optimizer.state.param.{KEY}", set(), KEY) == KEY  # not in the checkpoint: left as is


def test_dp_reshardable_state_resumes_only_under_the_distributed_optimizer():
    o.check_translatable("distributed", "distributed", "dp_reshardable", "ckpt")
    o.check_translatable("plain", "distributed", "fully_reshardable", "ckpt")
    with pytest.raises(UserError) as info:
        o.check_translatable("plain", "distributed", "dp_reshardable", "runs/x/checkpoints/iter_0000005")
    assert str(info.value) == (
        "checkpoint 'runs/x/checkpoints/iter_0000005' holds the distributed optimizer's state as flat "
        "dp_reshardable buffers, which only parallel.distributed_optimizer = true reads; resume with it "
        "(and save with checkpoint.optimizer_format = fully_reshardable to change optimizer kinds)"
    )
