"""What the benchmarks share: the repository root, a synchronized wall-clock timer, and samples of
random tokens (a step's time and memory do not depend on the text)."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]


def seconds(fn: Callable[[], Any], device: Any) -> float:
    """Wall time of one call of `fn`, with the CUDA queue drained before and after on a GPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class RandomSamples:
    """Samples of uniformly random tokens (the memory of a step does not depend on the text)."""

    def __init__(self, seq_length: int, vocab_size: int, seed: int = 0):
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed

    def __getitem__(self, i: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        tokens = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {
            "tokens": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }
