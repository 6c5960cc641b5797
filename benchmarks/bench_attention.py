"""Benchmark: our SDPA core attention against megatron-core's score-matrix DotProductAttention.

One process, one implementation per run (so whole-process peak memory is attributable):

    python -m benchmarks.bench_attention --impl sdpa --seq 4096
    python -m benchmarks.bench_attention --impl megatron --seq 4096

Prints forward+backward seconds per iteration and the process's peak RSS. Compare the two side by
side in one session (docs/benchmarks.md says how the recorded figures were taken).
"""

from __future__ import annotations

import argparse
import resource
import time


def _setup():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from parallel.layout import init_single_process
    from upstream.process import prepare_process

    prepare_process()
    init_single_process()
    model_parallel_cuda_manual_seed(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=("sdpa", "megatron"), required=True)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from model.attention.sdpa import SDPAttention
    from model.config import ModelConfig
    from model.gpt import ModelBuild, transformer_config

    _setup()
    hidden = args.heads * args.head_dim
    config = transformer_config(
        ModelConfig(
            hidden_size=hidden, num_attention_heads=args.heads, num_query_groups=args.groups, ffn_hidden_size=hidden
        ),
        ModelBuild(),
    )
    cls = SDPAttention if args.impl == "sdpa" else DotProductAttention
    attention = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s = args.seq
    q = torch.randn(s, 1, args.heads, args.head_dim, requires_grad=True)
    k = torch.randn(s, 1, args.groups, args.head_dim, requires_grad=True)
    v = torch.randn(s, 1, args.groups, args.head_dim, requires_grad=True)
    mask = None if args.impl == "sdpa" else torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    times = []
    for _ in range(args.iters + 1):
        start = time.perf_counter()
        attention(q, k, v, mask).sum().backward()
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = min(times[1:])
    print(f"impl={args.impl} seq={s} fwd+bwd {best:.3f} s/iter (best of {args.iters}), peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
