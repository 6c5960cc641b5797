"""Blend indexed datasets into packed samples addressed by one global sample index; cut them into per-DP-rank micro-batches.

Sample i of a split depends on the data, the split, seq_length and the seed only: never on the number of
ranks, the batch layout or the length of the run. A run that resumes at consumed sample c (at any
data-parallel size) therefore reads samples c, c+1, … exactly as the uninterrupted run would.

- megatron-core builds each dataset's split (BlendedMegatronDatasetBuilder + GPTDataset): documents
  shuffled by seed, packed with their EODs into windows of seq_length + 1 tokens, windows shuffled,
  indices cached on disk (rank 0 builds, the others wait at a barrier, then load).
- It is built for one epoch (num_samples=None): megatron-core sizes the indices by the run length
  otherwise, so a run of 2k steps would see other samples than a run of k steps resumed to 2k.
  Later epochs reuse the packing in a fresh order per epoch (`SourceSamples`).
- Datasets are interleaved by megatron-core's own greedy blending (helpers.build_blending_indices),
  whose choice for sample i depends only on samples before i, so it is extended on demand.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy
import torch

from common.errors import UserError
from data.config import DataConfig, parse_split

SPLITS = ("train", "valid", "test")


class Samples(Protocol):
    """What the batch plan reads: sample i of a split, as megatron-core's GPTDataset gives it."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]: ...


# ---- opening and checking one indexed dataset ---------------------------------------------------


def open_indexed(prefix: str) -> Any:
    """megatron-core's IndexedDataset, after checking what megatron would only assert or crash on later:
    both files exist, the .idx parses, and the .bin holds every token the .idx points to."""
    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise UserError(f"data file '{path}' not found: {build_command(prefix)}, or fix the data path")
        if not os.access(path, os.R_OK):
            raise UserError(f"data file '{path}' cannot be read (permission denied)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # Built in two steps so that a failed __init__ can be given the attributes IndexedDataset.__del__
    # deletes; otherwise the garbage collector prints an AttributeError traceback after our one line.
    indexed = IndexedDataset.__new__(IndexedDataset)
    try:
        indexed.__init__(prefix)
    except (AssertionError, ValueError, TypeError, OSError, IndexError):
        indexed.bin_reader = indexed.index = None
        raise UserError(
            f"data file '{prefix}.idx' is truncated or not a megatron-core index: rebuild it with "
            "'python -m data.preprocess'"
        ) from None
    _check_bin_size(indexed, prefix)
    return indexed


QUICKSTART_PREFIX = os.path.join("runs", "quickstart", "corpus", "text_document")  # the tiny recipes' data.path


def build_command(prefix: str) -> str:
    """How to build the corpus `prefix`: the quickstart's own command for the tiny recipes' path."""
    if os.path.normpath(prefix).endswith(QUICKSTART_PREFIX):
        return f"build it with 'python -m data.preprocess quickstart --output-prefix {prefix}' (or bash scripts/quickstart.sh)"
    return f"build it with 'python -m data.preprocess text --input FILES --output-prefix {prefix}'"


def _check_bin_size(indexed: Any, prefix: str) -> None:
    index = indexed.index
    expected = 0
    if len(index):
        expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise UserError(
            f"data file '{prefix}.bin' holds {actual} bytes but '{prefix}.idx' describes {expected}: "
            "one of them is truncated or from another build; rebuild both with 'python -m data.preprocess'"
        )


def check_vocabulary_fits(indexed: Any, prefix: str, vocab_size: int) -> None:
    """uint16 files cannot hold ids ≥ 65536: such a file was written for another tokenizer."""
    limit = numpy.iinfo(indexed.index.dtype).max + 1
    if vocab_size > limit:
        raise UserError(
            f"data file '{prefix}.bin' stores {numpy.dtype(indexed.index.dtype).name} token ids (< {limit}) "
            f"but the tokenizer has {vocab_size} ids: it was built for another tokenizer; rebuild it "
            "with 'python -m data.preprocess' and this tokenizer"
        )


# ---- one dataset split, repeated for ever -------------------------------------------------------


class _EodOnly:
    """What megatron-core's GPTDataset asks of a tokenizer: the EOD id (and a cache identity)."""

    vocab_size = None

    def __init__(self, eod: int):
        self.eod = eod
        self.unique_identifiers = {"class": "EodOnly", "eod": eod}


class SourceSamples:
    """One dataset's split (a one-epoch megatron-core GPTDataset) as an endless sample sequence.

    Sample j is GPTDataset item j for j < len (megatron's own shuffled order); epoch e ≥ 1 visits
    the same windows in the order permutation_e, drawn from RandomState([seed, e]).
    """

    def __init__(self, gpt_dataset: Any, prefix: str, seed: int, document_ids: bool = False):
        self.gpt = gpt_dataset
        self.prefix = prefix
        self.seed = seed
        self.document_ids = document_ids  # items carry "document_ids" (data.reset_attention_mask)
        self._permutations: dict[int, numpy.ndarray] = {}

    def __len__(self) -> int:
        return len(self.gpt)

    def position(self, j: int) -> int:
        """GPTDataset index of endless sample j."""
        if j < 0:
            raise IndexError(f"sample index {j} is negative")
        epoch, offset = divmod(int(j), len(self.gpt))
        return offset if epoch == 0 else int(self._permutation(epoch)[offset])

    def __getitem__(self, j: int) -> dict:
        item = self.gpt[self.position(j)]
        if self.document_ids:
            item["document_ids"] = document_ids(item["tokens"], self.gpt.config.tokenizer.eod)
        return item

    def documents(self, j: int) -> list[int]:
        """Ids (in the dataset's .idx) of the documents endless sample j is cut from, in order."""
        _, documents = self.gpt._query_document_sample_shuffle_indices(self.position(j))
        return [int(d) for d in documents]

    def _permutation(self, epoch: int) -> numpy.ndarray:
        # Batches straddle at most one epoch boundary at a time: keep the last two orders.
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = numpy.random.RandomState([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(len(self.gpt))
        return self._permutations[epoch]


class BlendedSamples:
    """Several SourceSamples interleaved in proportion to their weights; sample i → (source, j)."""

    def __init__(self, sources: Sequence[SourceSamples], weights: Sequence[float]):
        self.sources = list(sources)
        total = float(sum(weights))
        self.weights = numpy.array([w / total for w in weights], dtype=numpy.float64)
        self._source = numpy.zeros(0, dtype=numpy.int16)
        self._sample = numpy.zeros(0, dtype=numpy.int64)

    def locate(self, i: int) -> tuple[int, int]:
        """(source number, endless sample index in that source) of global sample i."""
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        if len(self.sources) == 1:
            return 0, int(i)
        if i >= self._source.size:
            self._extend(max(2 * self._source.size, i + 1, 1024))
        return int(self._source[i]), int(self._sample[i])

    def _extend(self, size: int) -> None:
        # The greedy choice for sample i looks only at samples before i, so a longer table starts
        # with the shorter one: the blend of a sample never depends on how far a run goes.
        from megatron.core.datasets import helpers

        source = numpy.zeros(size, dtype=numpy.int16)
        sample = numpy.zeros(size, dtype=numpy.int64)
        helpers.build_blending_indices(source, sample, self.weights, len(self.sources), size, False)
        self._source, self._sample = source, sample

    def __getitem__(self, i: int) -> dict:
        source, j = self.locate(i)
        return self.sources[source][j]

    def origin(self, i: int) -> tuple[str, int, list[int]]:
        """(dataset prefix, megatron-core GPTDataset index, document ids) of global sample i."""
        source, j = self.locate(i)
        origin = self.sources[source]
        return origin.prefix, origin.position(j), origin.documents(j)


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[s] int32: which document of the sample each input token is in (0 for the first). A document
    ends at its EOD, as megatron-core's GPTDataset marks them (gpt_dataset.py,
    _get_ltor_masks_and_position_ids): the token after an EOD starts the next one. The compact
    form of the document mask; never an s x s mask."""
    ends = (tokens == eod).to(torch.int32)
    return (torch.cumsum(ends, 0, dtype=torch.int32) - ends).contiguous()


# ---- building the splits ------------------------------------------------------------------------


def blend_of(path: str | None, blend: Sequence[tuple[float, str]] | None) -> list[tuple[float, str]]:
    """data.path / data.blend (or their valid_ twins) as one list of (weight, prefix)."""
    if blend is not None:
        return [(float(w), str(p)) for w, p in blend]
    return [(1.0, path)] if path is not None else []


def build_source_splits(
    prefix: str,
    split: str,
    seq_length: int,
    seed: int,
    eod: int,
    eod_mask_loss: bool,
    cache_dir: str,
    vocab_size: int,
    reset_position_ids: bool = False,
) -> list[object | None]:
    """megatron-core GPTDatasets for the train/valid/test document ranges of one prefix (None: no share).

    Call on every rank at once when torch.distributed is initialized: rank 0 builds and caches the
    indices, the others wait at a barrier and then load them.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_vocabulary_fits(open_indexed(prefix), prefix, vocab_size)
    # megatron-core names its cache files by the prefix path, not the content: a corpus rebuilt
    # under the same prefix must not meet the indices of the old one.
    sizes = "-".join(str(os.path.getsize(prefix + ending)) for ending in (".bin", ".idx"))
    cache = os.path.join(cache_dir, f"{os.path.basename(prefix)}-{sizes}")
    check_cache_files(cache)
    # Rank 0 writes the indices only once every rank has checked what was there: checked while
    # rank 0 wrote, a half-written index file failed the check on a slower rank (seen in CI).
    # Every rank sees the same files here, so a refusal is every rank's.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        path_to_cache=cache,
        tokenizer=_EodOnly(eod),
        mmap_bin_files=True,
        reset_position_ids=reset_position_ids,  # megatron-core restarts position_ids after each EOD
        reset_attention_mask=False,  # its mask would be s x s: we hand on document ids instead
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # causal attention builds its own mask
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, [None] * 3, lambda: True, config).build()


def check_cache_files(folder: str) -> None:
    """Refuses index files megatron-core would load with `numpy.load(allow_pickle=True)`
    (gpt_dataset.py): a file without the .npy header is unpickled there, so a cache folder from
    elsewhere could run code. Each must be a plain .npy array of numbers."""
    from numpy.lib import format as npy

    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npy"):
            continue
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            try:
                version = npy.read_magic(f)
                read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[version]
                dtype = read_header(f)[2]
            except (ValueError, KeyError, EOFError):
                dtype = None
        if dtype is None or dtype.hasobject:
            raise UserError(
                f"data cache file '{path}' is not a plain numpy array (loading it could run "
                f"code): delete the folder '{folder}' and it is built again"
            )


def _require_samples(dataset: Any, prefix: str, split_name: str, split: str, seq_length: int) -> None:
    if dataset is not None and len(dataset) > 0:
        return
    tokens = int(numpy.sum(dataset.dataset.sequence_lengths[dataset.indices])) if dataset is not None else 0
    whole = split_name == "train" and parse_split(split)[1:] == [0.0, 0.0]
    share = "" if whole else f": its {split_name} share (data.split '{split}')"
    raise UserError(
        f"data file '{prefix}.bin'{share} holds {tokens} tokens, too few for one sample of seq_length "
        f"{seq_length} (needs {seq_length + 1}): use more data or a shorter seq_length"
    )


def build_samples(
    train_blend: list[tuple[float, str]],
    valid_blend: list[tuple[float, str]],
    split: str,
    seq_length: int,
    seed: int,
    eod: int,
    eod_mask_loss: bool,
    cache_dir: str,
    vocab_size: int,
    with_test: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
) -> dict[str, BlendedSamples]:
    """{'train': …, 'valid': …, 'test': …} (valid only when there is validation data, test only when
    asked for). The train blend's datasets are split by document shares `split` (its test share is
    held out, and read only `with_test`); a non-empty `valid_blend` is used whole as the validation
    data instead of a valid share. `reset_position_ids`: position_ids restart at each document;
    `reset_attention_mask`: each sample also carries its "document_ids" (`document_ids`)."""
    names = SPLITS if with_test else SPLITS[:2]
    jobs = [(train_blend, split)] + ([(valid_blend, "0,1,0")] if valid_blend else [])
    per_split: dict[str, list[tuple[float, SourceSamples]]] = {}
    for blend, source_split in jobs:
        for weight, prefix in blend:
            datasets = build_source_splits(
                prefix, source_split, seq_length, seed, eod, eod_mask_loss, cache_dir, vocab_size, reset_position_ids
            )
            for name, dataset in zip(names, datasets):
                if dataset is None:
                    continue
                _require_samples(dataset, prefix, name, source_split, seq_length)
                per_split.setdefault(name, []).append(
                    (weight, SourceSamples(dataset, prefix, seed, reset_attention_mask))
                )
    return {
        name: BlendedSamples([s for _, s in entries], [w for w, _ in entries]) for name, entries in per_split.items()
    }


def build_data(
    cfg: DataConfig, seq_length: int, seed: int, tokenizer: Any, cache_dir: str, with_test: bool = False
) -> dict[str, BlendedSamples]:
    """The `data` section's samples (build_samples) for sequences of `seq_length` tokens of
    `tokenizer` (its EOD and vocabulary); every rank calls this at once."""
    train_blend = blend_of(cfg.path, cfg.blend)
    if not train_blend:
        raise UserError("no training data: set data.path to an indexed dataset prefix, or data.blend")
    return build_samples(
        train_blend,
        blend_of(cfg.valid_path, cfg.valid_blend),
        cfg.split,
        seq_length=seq_length,
        seed=seed,
        eod=tokenizer.eod,
        eod_mask_loss=cfg.eod_mask_loss,
        cache_dir=cache_dir,
        vocab_size=tokenizer.vocab_size,
        with_test=with_test,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
    )


# ---- context parallelism ------------------------------------------------------------------------


def slice_for_context_parallel(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This context-parallel rank's share of each [b, s] tensor: megatron's load-balanced layout.

    Each sequence is cut into 2·cp equal chunks and rank r keeps chunks r and 2·cp−1−r, so under a
    causal mask every rank has the same amount of attention work. "document_ids" stay whole: the
    attention of every rank needs those of the other ranks' chunks too (b·s integers).
    """
    if cp_size == 1:
        return batch
    out = {}
    for key, value in batch.items():
        if key == "document_ids":
            out[key] = value
            continue
        b, s = value.shape
        chunks = value.view(b, 2 * cp_size, s // (2 * cp_size))  # [b, 2cp, s/2cp]
        keep = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank])
        out[key] = chunks.index_select(1, keep).reshape(b, -1)  # [b, s/cp]
    return out
