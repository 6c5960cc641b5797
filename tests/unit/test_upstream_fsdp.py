"""The FSDP optimizer-state fixes (upstream/fsdp.py) on one process: without each, its upstream site
fails with its own error; with it, the state maps onto the shards and survives a load. (The fixes
that need several ranks are tests/distributed/test_fsdp.py's.)"""

import pytest
import torch

from tests.helpers.fixes import unfixed

SEQ = 16


@pytest.fixture
def fsdp_step(megatron_single_process):
    """tiny model under zero3 on one rank, its plain (FP32) optimizer, and a function running one
    training step (forward, backward, optimizer step)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from model.config import ModelConfig
    from model.gpt import ModelBuild, build_model
    from model.precision import Precision
    from parallel.data_parallel import wrap_data_parallel
    from parallel.layout import Layout
    from pretrain.optim import Numerics, OptimizerConfig, build_optimizer

    groups = ProcessGroupCollection.use_mpu_process_groups()
    model = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, seq_length=SEQ)
    build = ModelBuild(layout=Layout(world_size=1, fsdp="zero3"))
    chunks = wrap_data_parallel(build_model(model, build, 64, torch.device("cpu"), groups), False, groups, fsdp="zero3")
    optimizer = build_optimizer(OptimizerConfig(), Numerics(Precision(), 1.0, SEQ), chunks, False, fp32_params=True)
    tokens = torch.randint(0, 64, (1, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        optimizer.zero_grad()
        loss = chunks[0](tokens[:, :-1], torch.arange(SEQ).unsqueeze(0), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        return float(loss)

    return chunks, optimizer, step


def test_optimizer_state_maps_onto_the_fsdp_shards(fsdp_step):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    chunks, optimizer, step = fsdp_step
    step()
    model = chunks[0].module.sharded_state_dict()
    with unfixed("dist_checkpointing.optimizer.to_local_if_dtensor"):
        with pytest.raises(ValueError, match="Param id 0 does not match any model sharded param"):
            optimizer.sharded_state_dict(model)
    state = optimizer.sharded_state_dict(model)
    moments = [t for t in nested_values(state) if isinstance(t, ShardedTensor | ShardedTensorFactory)]
    params = list(chunks[0].parameters())
    assert len(moments) == 2 * len(params)  # exp_avg and exp_avg_sq of every parameter
    assert all(t.key.startswith(("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.")) for t in moments)


def _as_loaded(state: dict) -> dict:
    """The optimizer's state dict as a dist_checkpointing load hands it over: local shards."""
    from torch.distributed.tensor import DTensor

    local = {
        i: {k: v.to_local().clone() if isinstance(v, DTensor) else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return {"state": local, "param_groups": state["param_groups"]}


def test_plain_optimizer_loads_local_shards_back_as_dtensors(fsdp_step):
    from torch.distributed.tensor import DTensor

    chunks, optimizer, step = fsdp_step
    step()
    saved = _as_loaded(optimizer.state_dict())
    with unfixed("FP32Optimizer.load_state_dict"):
        optimizer.load_state_dict(_as_loaded(optimizer.state_dict()))
        with pytest.raises(RuntimeError, match="got mixed torch.Tensor and DTensor"):
            step()
    optimizer.load_state_dict(saved)
    states = list(optimizer.optimizer.state.values())
    assert all(isinstance(s["exp_avg"], DTensor) and isinstance(s["exp_avg_sq"], DTensor) for s in states)
    step()


@pytest.mark.parametrize("fsdp, sharded_after_forward", [("zero3", True), ("zero2", False)])
def test_zero3_frees_gathered_weights_after_forward_and_zero2_keeps_them(
    fsdp, sharded_after_forward, megatron_single_process
):
    """What tells the two apart (their numbers are the same): after a forward, a zero3 layer holds
    its sharded parameters again, a zero2 layer still the gathered ones (for its backward)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from torch.distributed.tensor import DTensor

    from model.config import ModelConfig
    from model.gpt import ModelBuild, build_model
    from parallel.data_parallel import wrap_data_parallel
    from parallel.layout import Layout

    groups = ProcessGroupCollection.use_mpu_process_groups()
    model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, seq_length=SEQ)
    build = ModelBuild(layout=Layout(world_size=1, fsdp=fsdp))
    (chunk,) = wrap_data_parallel(build_model(model, build, 64, torch.device("cpu"), groups), False, groups, fsdp=fsdp)
    tokens = torch.randint(0, 64, (1, SEQ + 1), generator=torch.Generator().manual_seed(0))
    chunk(tokens[:, :-1], torch.arange(SEQ).unsqueeze(0), None, labels=tokens[:, 1:])
    layer = chunk.module.decoder.layers[0]
    assert isinstance(layer.mlp.linear_fc1.weight, DTensor) is sharded_after_forward


def test_uneven_shards_are_refused_with_the_parameter_named():
    from parallel.data_parallel import uneven_shards

    where = "the 3 ranks it is sharded over (data × context-parallel, or expert-data-parallel for experts)"
    assert uneven_shards("decoder.layers.0.input_layernorm.weight", 64, 3, gated=True) == (
        f"parallel.fsdp: decoder.layers.0.input_layernorm.weight has 64 rows per tensor-parallel rank, which do "
        f"not split evenly over {where}; choose sizes that divide 64"
    )
    assert uneven_shards("decoder.layers.0.mlp.linear_fc1.weight", 354, 3, gated=True) == (
        f"parallel.fsdp: decoder.layers.0.mlp.linear_fc1.weight is [gate; up], and each of {where} must hold "
        f"rows of one half: use an even number"
    )
    assert uneven_shards("decoder.layers.0.mlp.linear_fc1.weight", 354, 3, gated=False) is None
    assert uneven_shards("decoder.layers.0.mlp.linear_fc1.weight", 352, 4, gated=True) is None
    assert uneven_shards("decoder.layers.0.mlp.linear_fc1.weight", 352, 1, gated=True) is None
