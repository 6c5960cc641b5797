"""The data cache on 2 gloo ranks: rank 0 writes megatron-core's index files only after every rank
has checked the files already there (data/dataset.py:build_source_splits). Here rank 0 writes its first
index file in two halves a moment apart and rank 1 checks late: checked while rank 0 wrote, rank 1
read a half-written file and refused the cache as unsafe (a CI failure at TP2 x DP2)."""

import time

import pytest

from tests.helpers.spawn import run_distributed


def _build_with_slow_writes(rank: int, world: int, prefix: str, cache_dir: str) -> int:
    import numpy

    from data import dataset
    from data.tokenizer import ByteTokenizer

    if rank == 0:
        save, saved = numpy.save, []

        def save_in_two_halves(path, array, *args, **kwargs):
            saved.append(path)
            if len(saved) == 1:
                with open(path, "wb") as f:
                    f.write(b"\x93NUMPY")  # the magic, no header yet
                time.sleep(2.0)
            save(path, array, *args, **kwargs)

        numpy.save = save_in_two_halves
    else:
        check = dataset.check_cache_files

        def late_check(folder: str) -> None:
            time.sleep(1.0)  # rank 0 is inside its first write by now, unless it waits for this check
            check(folder)

        dataset.check_cache_files = late_check
    eod = ByteTokenizer().eod
    built = dataset.build_source_splits(prefix, "90,10,0", 64, 1234, eod, False, cache_dir, 257)
    return len(built[0])


@pytest.mark.slow
def test_index_files_are_written_after_every_rank_checked(tmp_path):
    from data.preprocess import build_synthetic_corpus

    prefix = str(tmp_path / "corpus")
    build_synthetic_corpus(prefix, num_docs=200, seed=0)
    lengths = run_distributed(_build_with_slow_writes, 2, prefix, str(tmp_path / "cache"))
    assert lengths[0] == lengths[1] > 0
