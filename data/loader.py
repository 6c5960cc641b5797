"""This rank's share of every global batch (the batch plan), and the loader that reads it ahead.

A step reads samples [first, first + global_batch_size); data-parallel rank r takes micro-batch m
as samples first + (m·dp + r)·mbs …, and each context-parallel rank its slices of the sequence
(`data.dataset.slice_for_context_parallel`). `BatchPlan` is the one place the micro-batch count is
computed: the recipe's world-size check, the dry run and the trainer all read it from here.

With `data.num_workers > 0`, item n of `RankMicroBatches` is micro-batch n mod m of step n div m,
counted from the step that starts at sample `first`: the same tensors `BatchPlan.batch` gives in
the training process, only built in a torch DataLoader worker while the model computes the step
before. The sample order therefore does not depend on the number of workers, and a resume starts
the loader at the resumed step's first sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from common.errors import RecipeError
from data.dataset import Samples, slice_for_context_parallel

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
DOCUMENT_KEY = "document_ids"  # [b, s] int32, only with data.reset_attention_mask (whole under CP)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which part of each global batch one rank reads; the global batch must split evenly."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int = 1
    dp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step:
            raise RecipeError(
                f"train.global_batch_size = {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size × data-parallel size = {self.micro_batch_size} × "
                f"{self.dp_size} = {per_step}"
            )

    def for_rank(self, dp_rank: int, cp_rank: int, cp_size: int) -> BatchPlan:
        return dataclasses.replace(self, dp_rank=dp_rank, cp_rank=cp_rank, cp_size=cp_size)

    @property
    def micro_batches(self) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def indices(self, first: int, micro_index: int) -> range:
        """Global sample indices of micro-batch `micro_index` of the global batch at sample `first`."""
        if not 0 <= micro_index < self.micro_batches:
            raise IndexError(f"micro_index {micro_index} outside [0, {self.micro_batches})")
        start = first + (micro_index * self.dp_size + self.dp_rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def whole_batch(self, samples: Samples, first: int, micro_index: int) -> dict[str, torch.Tensor]:
        """tokens/labels/loss_mask/position_ids (and document_ids where the samples carry them) [b, s]
        of this data-parallel rank's micro-batch."""
        items = [samples[i] for i in self.indices(first, micro_index)]
        keys = BATCH_KEYS + ((DOCUMENT_KEY,) if DOCUMENT_KEY in items[0] else ())
        return {key: torch.stack([item[key] for item in items]).contiguous() for key in keys}  # [b, s]

    def batch(self, samples: Samples, first: int, micro_index: int) -> dict[str, torch.Tensor]:
        """This rank's [b, s/cp] tensors of micro-batch `micro_index` of the global batch at `first`."""
        return slice_for_context_parallel(self.whole_batch(samples, first, micro_index), self.cp_rank, self.cp_size)

    def step_batches(self, samples: Samples, first: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """All of this rank's micro-batches of the global batch at sample `first`, on `device`."""
        return [{k: v.to(device) for k, v in self.batch(samples, first, m).items()} for m in range(self.micro_batches)]


def token_ids_beyond(samples: Samples, first: int, count: int, vocab_size: int) -> str:
    """Names the first of samples [first, first + count) holding a token id outside [0, vocab_size):
    its dataset, document and id. For the error after a rank found one (host-side, reads the whole
    global batch); '' when there is none."""
    for i in range(first, first + count):
        item = samples[i]
        ids = torch.cat([item["tokens"], item["labels"][-1:]])
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.numel():
            where = _sample_origin(samples, i)
            return (
                f"{where} holds token id {int(bad[0])}, outside the model's {vocab_size} ids: it was built "
                "with another tokenizer than data.tokenizer; rebuild it with 'python -m data.preprocess' "
                "and this tokenizer (or set data.tokenizer to the one it was built with)"
            )
    return ""


def _sample_origin(samples: Samples, i: int) -> str:
    """'data file PREFIX.bin (documents …, sample i)' for a BlendedSamples; 'sample i' otherwise."""
    if not hasattr(samples, "origin"):
        return f"sample {i}"
    prefix, _, documents = samples.origin(i)
    return f"data file '{prefix}.bin' (documents {', '.join(map(str, documents))}, read as sample {i})"


class RankMicroBatches(Dataset):
    """`steps` steps of this rank's micro-batches, from the global batch that starts at sample `first`."""

    def __init__(self, samples: Samples, plan: BatchPlan, first: int, steps: int):
        self.samples, self.plan, self.first, self.steps = samples, plan, first, steps

    def __len__(self) -> int:
        return self.steps * self.plan.micro_batches

    def __getitem__(self, n: int) -> dict:
        step, micro_index = divmod(n, self.plan.micro_batches)
        return self.plan.batch(self.samples, self.first + step * self.plan.global_batch_size, micro_index)


class PrefetchingLoader:
    """Hands out one step's micro-batches at a time while `workers` processes build the next ones.

    Workers are forked (they inherit the opened datasets and never touch the process group or the
    GPU); with `pin` the batches arrive in pinned memory and are copied to the device asynchronously.
    """

    def __init__(self, samples: Samples, plan: BatchPlan, first: int, steps: int, workers: int, device: torch.device):
        self.plan, self.next_first, self.device = plan, first, device
        loader = DataLoader(
            RankMicroBatches(samples, plan, first, steps),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            multiprocessing_context="fork" if workers else None,
        )
        self._batches: Iterator[dict[str, torch.Tensor]] | None = iter(loader)

    def step_batches(self, first: int) -> list[dict]:
        """The micro-batches of the global batch at sample `first`, which must be the next one in order."""
        if first != self.next_first:
            raise RuntimeError(f"data loader is at sample {self.next_first}, the step asked for sample {first}")
        self.next_first += self.plan.global_batch_size
        assert self._batches is not None, "the loader was closed"
        return [
            {key: value.to(self.device, non_blocking=True) for key, value in next(self._batches).items()}
            for _ in range(self.plan.micro_batches)
        ]

    def close(self) -> None:
        """Stops the workers (also done when the loader is garbage-collected)."""
        self._batches = None


class TrainBatches:
    """The training steps' micro-batches, in order from sample `first`: read ahead by `workers`
    processes, or built in this process when there are none."""

    def __init__(self, samples: Samples, plan: BatchPlan, first: int, steps: int, workers: int, device: torch.device):
        self.samples, self.plan, self.device = samples, plan, device
        self.loader = PrefetchingLoader(samples, plan, first, steps, workers, device) if workers else None

    def step(self, first: int) -> list[dict]:
        if self.loader is not None:
            return self.loader.step_batches(first)
        return self.plan.step_batches(self.samples, first, self.device)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
