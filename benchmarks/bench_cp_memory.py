"""Benchmark: a whole model's activation memory per rank vs context-parallel size.

    python -m benchmarks.bench_cp_memory                                    # CP = 1
    torchrun --standalone --nproc_per_node=4 -m benchmarks.bench_cp_memory  # CP = 4

The model is built as training builds it (recipe → layout → model), with `parallel.context` set to
the number of processes. One micro-batch of random tokens is cut per CP rank as the data loader
cuts it (load-balanced chunks), and one forward + backward runs through megatron-core's schedule
and our loss. The figure is that step's activation memory: the most bytes live in torch's allocator
during it beyond what was live before it (parameters, gradient buffers), on the CPU from the
profiler's allocation events, on a GPU `torch.cuda.max_memory_allocated`
(pretrain/profiling.py:peak_mib). Largest over ranks.

Default model (the `--recipe` overrides below): tiny_gpt widened to 1024 hidden, 8 query heads on 2
K/V heads of 128, 4 layers, 8K tokens, micro-batch 1, fp32. Extra `key.path=value` arguments
override it further, as on pretrain_gpt.py's command line.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULTS = [
    "model.seq_length=8192",
    "model.hidden_size=1024",
    "model.ffn_hidden_size=2816",
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.num_layers=4",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
    "logging.wandb.mode=disabled",
]


def _batch(recipe: Any, vocab_size: int, cp_rank: int, cp_size: int, device: Any) -> dict:
    """One micro-batch [1, s] of random tokens, this CP rank's load-balanced share of it."""
    import torch

    from data.dataset import slice_for_context_parallel

    s = recipe.model.seq_length
    tokens = torch.randint(0, vocab_size, (1, s + 1), generator=torch.Generator().manual_seed(0))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(s).unsqueeze(0),
        "loss_mask": torch.ones(1, s),
    }
    return {k: v.contiguous().to(device) for k, v in slice_for_context_parallel(batch, cp_rank, cp_size).items()}


def _step(recipe: Any, chunks: list, batch: dict) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pretrain.step import forward_step

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=chunks[0],
        num_microbatches=1,
        seq_length=recipe.model.seq_length,
        micro_batch_size=1,
        forward_only=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="tiny_gpt")
    parser.add_argument("overrides", nargs="*", help="key.path=value, after the defaults")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))

    from pretrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, DEFAULTS + [f"parallel.context={world}"] + args.overrides)
    from upstream.process import prepare_process

    prepare_process()
    import torch
    import torch.distributed as dist

    from data.tokenizer import build_tokenizer
    from model.gpt import ModelBuild, build_model
    from model.precision import Precision
    from parallel.data_parallel import wrap_data_parallel
    from parallel.layout import shutdown
    from pretrain.profiling import peak_mib
    from pretrain.trainer import build_runtime

    layout, _, rank, groups, device = build_runtime(recipe)
    vocab_size = recipe.model.vocab_size or build_tokenizer(recipe.data.tokenizer).vocab_size
    build = ModelBuild(layout=layout, precision=Precision(recipe.train.precision), init_seed=recipe.train.seed)
    chunks = wrap_data_parallel(
        build_model(recipe.model, build, vocab_size, device, groups), recipe.parallel.distributed_optimizer, groups
    )
    batch = _batch(recipe, vocab_size, rank.context_rank, layout.context, device)
    _step(recipe, chunks, batch)  # warm-up: kernel choice and its probe, gradient buffers
    peak = peak_mib(lambda: _step(recipe, chunks, batch), device)
    stats = torch.tensor([peak], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        m = recipe.model
        print(
            f"cp={layout.context} seq={m.seq_length} layers={m.num_layers} hidden={m.hidden_size} "
            f"heads={m.num_attention_heads}/{m.num_query_groups} {recipe.train.precision} on {device.type}: "
            f"activation memory of one forward + backward per rank {stats.item():.0f} MiB"
        )
    shutdown()


if __name__ == "__main__":
    main()
