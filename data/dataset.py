"""Pack an indexed corpus into shuffled fixed-length windows and cut them into per-DP-rank micro-batches."""

import os

import numpy
import torch

from pretrain.errors import UserError


def _open_indexed(prefix: str):
    """megatron-core's IndexedDataset, after naming any missing file (megatron would only assert)."""
    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise UserError(
                f"data file '{path}' not found: "
                "build it with 'python -m data.preprocess' or fix the data path"
            )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


class PackedDataset(torch.utils.data.Dataset):
    """All documents (each ending in EOD) as one token stream, cut into windows of seq_length + 1.

    Window w covers stream tokens [w*seq_length, w*seq_length + seq_length + 1): consecutive windows
    share one boundary token so every token is a label exactly once. Sample i of epoch e is window
    permutation_e[i % len], with permutation_e drawn from RandomState(seed + e); indices past len
    wrap into the next epoch, so a trainer can ask for any step without tracking epochs.
    """

    def __init__(self, prefix: str, seq_length: int, seed: int):
        self.prefix = prefix
        self.seq_length = seq_length
        self.seed = seed
        self._indexed = _open_indexed(prefix)
        lengths = self._indexed.sequence_lengths.astype(numpy.int64)
        # stream offset of each document's first token, plus the total at the end
        self._starts = numpy.concatenate(([0], numpy.cumsum(lengths)))
        self.num_tokens = int(self._starts[-1])
        self.num_windows = (self.num_tokens - 1) // seq_length if self.num_tokens else 0
        if self.num_windows < 1:
            raise UserError(
                f"data file '{prefix}.bin' holds {self.num_tokens} tokens, too few for one sample of "
                f"seq_length {seq_length} (needs {seq_length + 1}): use more data or a shorter seq_length"
            )
        self._permutations: dict[int, numpy.ndarray] = {}

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> numpy.ndarray:
        """int64 [seq_length + 1] tokens of sample `index` (any index ≥ 0; past len → later epochs)."""
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        epoch, position = divmod(int(index), self.num_windows)
        return self.window(int(self._permutation(epoch)[position]))

    def __iter__(self):
        # __getitem__ never raises IndexError for large indices, so the default protocol would not stop.
        return (self[i] for i in range(len(self)))

    def _permutation(self, epoch: int) -> numpy.ndarray:
        """Window order of `epoch`; the last two are kept since batches straddle one boundary at a time."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = numpy.random.RandomState(self.seed + epoch)
            self._permutations[epoch] = rng.permutation(self.num_windows)
        return self._permutations[epoch]

    def window(self, w: int) -> numpy.ndarray:
        """Window `w` in stream order (unshuffled): tokens [w*seq_length, w*seq_length + seq_length + 1)."""
        if not 0 <= w < self.num_windows:
            raise IndexError(f"window {w} outside [0, {self.num_windows})")
        return self.read_stream(w * self.seq_length, self.seq_length + 1)

    def read_stream(self, start: int, count: int) -> numpy.ndarray:
        """`count` int64 tokens of the concatenated stream from `start`, read document piece by piece."""
        if start < 0 or start + count > self.num_tokens:
            raise IndexError(f"stream range [{start}, {start + count}) outside [0, {self.num_tokens})")
        pieces = []
        document = int(numpy.searchsorted(self._starts, start, side="right")) - 1
        while count > 0:
            offset = start - int(self._starts[document])
            length = min(count, int(self._starts[document + 1]) - start)
            pieces.append(self._indexed.get(document, offset=offset, length=length))
            start, count, document = start + length, count - length, document + 1
        return numpy.concatenate(pieces).astype(numpy.int64)


def num_micro_batches(micro_batch_size: int, dp_size: int, global_batch_size: int) -> int:
    """Micro-batches each DP rank runs per optimizer step; gbs must split evenly over mbs × dp."""
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of "
            f"micro_batch_size {micro_batch_size} × data-parallel size {dp_size}"
        )
    return global_batch_size // (micro_batch_size * dp_size)


def sample_indices(step, micro_index, dp_rank, dp_size, micro_batch_size, global_batch_size) -> range:
    """Global sample indices of one micro-batch: a step's samples are the same set for every dp_size."""
    count = num_micro_batches(micro_batch_size, dp_size, global_batch_size)
    if not 0 <= micro_index < count:
        raise IndexError(f"micro_index {micro_index} outside [0, {count})")
    if not 0 <= dp_rank < dp_size:
        raise IndexError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    first = step * global_batch_size + micro_index * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return range(first, first + micro_batch_size)


def get_micro_batch(ds, step, micro_index, dp_rank, dp_size, micro_batch_size, global_batch_size) -> dict:
    """tokens/labels/loss_mask/position_ids [b, s] for one DP rank's micro-batch of optimizer `step`."""
    indices = sample_indices(step, micro_index, dp_rank, dp_size, micro_batch_size, global_batch_size)
    windows = torch.from_numpy(numpy.stack([ds[i] for i in indices]))  # [b, s + 1]
    tokens, labels = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # [b, s]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(tokens.shape, dtype=torch.float32),
        "position_ids": torch.arange(tokens.shape[1], dtype=torch.int64).expand_as(tokens).contiguous(),
    }


def slice_for_context_parallel(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This context-parallel rank's share of each [b, s] tensor: megatron's load-balanced layout.

    Each sequence is cut into 2·cp equal chunks and rank r keeps chunks r and 2·cp−1−r, so under a
    causal mask every rank has the same amount of attention work.
    """
    if cp_size == 1:
        return batch
    out = {}
    for key, value in batch.items():
        b, s = value.shape
        chunks = value.view(b, 2 * cp_size, s // (2 * cp_size))  # [b, 2cp, s/2cp]
        keep = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank])
        out[key] = chunks.index_select(1, keep).reshape(b, -1)  # [b, s/cp]
    return out
