"""This rank's training micro-batches, read ahead by worker processes (`data.num_workers`).

Item n of `RankMicroBatches` is micro-batch n mod m of step n div m (m micro-batches per step),
counted from the step that starts at sample `first`: the same tensors `data.dataset.get_micro_batch`
and `slice_for_context_parallel` give in the training process, only built in a torch DataLoader
worker while the model computes the step before. The sample order therefore does not depend on
the number of workers, and a resume starts the loader at the resumed step's first sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch.utils.data import DataLoader, Dataset

from data.dataset import get_micro_batch, num_micro_batches, slice_for_context_parallel


@dataclass(frozen=True)
class RankShare:
    """Which part of each global batch one rank reads."""

    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    micro_batch_size: int
    global_batch_size: int

    @property
    def micro_batches(self) -> int:
        return num_micro_batches(self.micro_batch_size, self.dp_size, self.global_batch_size)

    def batch(self, samples, first: int, micro_index: int) -> dict:
        """This rank's [b, s/cp] tensors of micro-batch `micro_index` of the global batch at `first`."""
        batch = get_micro_batch(samples, first, micro_index, self.dp_rank, self.dp_size,
                                self.micro_batch_size, self.global_batch_size)
        return slice_for_context_parallel(batch, self.cp_rank, self.cp_size)


class RankMicroBatches(Dataset):
    """`steps` steps of this rank's micro-batches, from the global batch that starts at sample `first`."""

    def __init__(self, samples, share: RankShare, first: int, steps: int):
        self.samples, self.share, self.first, self.steps = samples, share, first, steps

    def __len__(self) -> int:
        return self.steps * self.share.micro_batches

    def __getitem__(self, n: int) -> dict:
        step, micro_index = divmod(n, self.share.micro_batches)
        return self.share.batch(self.samples, self.first + step * self.share.global_batch_size, micro_index)


class PrefetchingLoader:
    """Hands out one step's micro-batches at a time while `workers` processes build the next ones.

    Workers are forked (they inherit the opened datasets and never touch the process group or the
    GPU); with `pin` the batches arrive in pinned memory and are copied to the device asynchronously.
    """

    def __init__(self, samples, share: RankShare, first: int, steps: int, workers: int, device: torch.device):
        self.share, self.next_first, self.device = share, first, device
        loader = DataLoader(
            RankMicroBatches(samples, share, first, steps), batch_size=None, shuffle=False,
            num_workers=workers, pin_memory=device.type == "cuda",
            multiprocessing_context="fork" if workers else None,
        )
        self._batches = iter(loader)

    def step_batches(self, first: int) -> List[dict]:
        """The micro-batches of the global batch at sample `first`, which must be the next one in order."""
        if first != self.next_first:
            raise RuntimeError(f"data loader is at sample {self.next_first}, the step asked for sample {first}")
        self.next_first += self.share.global_batch_size
        return [{key: value.to(self.device, non_blocking=True) for key, value in next(self._batches).items()}
                for _ in range(self.share.micro_batches)]

    def close(self) -> None:
        """Stops the workers (also done when the loader is garbage-collected)."""
        self._batches = None
