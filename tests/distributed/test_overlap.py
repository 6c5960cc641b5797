"""Communication overlap on 2 gloo ranks: the settings reach megatron-core's DDP (buckets, async
hooks), and with the distributed optimizer's overlapped all-gather the model's weights are stale
after a step until the next forward or parallel/data_parallel.py:sync_params (what a checkpoint
save relies on)."""

import pytest
import torch

from tests.helpers.spawn import run_distributed

SEQ = 32
VOCAB = 257


def _one_step(rank: int, world: int, overlap: bool) -> dict:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model.config import ModelConfig
    from model.gpt import ModelBuild, build_model
    from model.precision import Precision
    from parallel.data_parallel import sync_params, wrap_data_parallel
    from parallel.layout import Layout, init_model_parallel
    from pretrain.optim import Numerics, OptimizerConfig, build_optimizer
    from pretrain.step import forward_step
    from upstream import cpu

    cpu.enable(torch.device("cpu"))
    layout = Layout(world_size=world)
    _, groups = init_model_parallel(layout)
    model = ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2, seq_length=SEQ
    )
    chunks = build_model(model, ModelBuild(layout=layout), VOCAB, torch.device("cpu"), groups)
    chunks = wrap_data_parallel(
        chunks, True, groups, overlap_grad_reduce=overlap, overlap_param_gather=overlap, bucket_size=10_000
    )
    optimizer = build_optimizer(OptimizerConfig(lr=1e-2), Numerics(Precision(), 1.0, SEQ), chunks, distributed=True)
    (chunk,) = chunks
    config = chunk.config
    config.no_sync_func, config.finalize_model_grads_func = chunk.no_sync, finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    before = torch.cat([p.detach().flatten().clone() for p in chunk.parameters()])
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(SEQ).unsqueeze(0),
        "loss_mask": torch.ones(1, SEQ),
    }
    chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=chunk,
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=1,
    )
    optimizer.step()
    stale = torch.cat([p.detach().flatten().clone() for p in chunk.parameters()])
    sync_params(chunks)
    synced = torch.cat([p.detach().flatten().clone() for p in chunk.parameters()])
    return {
        "buckets": torch.tensor(len(chunk.bucket_groups)),
        "overlap": torch.tensor([chunk.ddp_config.overlap_grad_reduce, chunk.ddp_config.overlap_param_gather]),
        "before": before,
        "stale": stale,
        "synced": synced,
    }


def test_overlapped_gather_leaves_weights_stale_until_synced():
    ranks = run_distributed(_one_step, 2, True)
    for r in ranks:
        assert r["overlap"].tolist() == [True, True]
        assert r["buckets"].item() > 1  # bucket_size reached megatron-core: several in flight
        # after the step each rank updated its own shard only: the rest is the old weights
        changed = (r["stale"] != r["before"]).float().mean().item()
        assert 0.3 < changed < 0.7, changed
    # synced, both replicas hold every updated weight, and they agree
    assert torch.equal(ranks[0]["synced"], ranks[1]["synced"])
    assert (ranks[0]["synced"] != ranks[0]["before"]).float().mean().item() > 0.95
    assert not torch.equal(ranks[0]["stale"], ranks[1]["stale"])


@pytest.mark.slow
def test_without_overlap_the_step_gathers_and_agrees():
    """The control: overlap off, the optimizer step all-gathers at once: no stale weights."""
    ranks = run_distributed(_one_step, 2, False)
    for r in ranks:
        assert r["overlap"].tolist() == [False, False]
        assert torch.equal(r["stale"], r["synced"])
    assert torch.equal(ranks[0]["stale"], ranks[1]["stale"])
