"""Sharding and joining: `data.preprocess text --shard I/3` over inputs of every
splitting kind (jsonl byte ranges, parquet row groups, a saved dataset's rows, whole compressed files),
then `python -m data.merge` of the shards in order, is byte-identical to one run; the merge's checks."""

import shutil

import pytest

from data.merge import main as merge_main
from data.preprocess import main
from tests.helpers.corpora import TEXTS, file_bytes, write_gzip, write_jsonl, write_parquet, write_saved_dataset


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    write_jsonl(folder / "a.jsonl", TEXTS[:60])
    write_parquet(folder / "b.parquet", TEXTS[60:90], row_group_size=4)
    write_saved_dataset(folder / "c", TEXTS[90:120])
    write_jsonl(folder / "d.jsonl", TEXTS[120:135])
    write_gzip(folder / "d.jsonl.gz", folder / "d.jsonl")
    write_jsonl(folder / "e.jsonl", TEXTS[135:])
    write_gzip(folder / "e.jsonl.gz", folder / "e.jsonl")
    return [str(folder / name) for name in ("a.jsonl", "b.parquet", "c", "d.jsonl.gz", "e.jsonl.gz")]


def _preprocess(inputs, prefix, bpe_path, *extra):
    argv = ["text", "--input", *inputs, "--tokenizer", bpe_path, "--output-prefix", prefix, "--part-bytes", "600"]
    assert main([*argv, *extra]) == 0


def test_shards_merged_in_order_equal_one_run(tmp_path, inputs, bpe_path, capsys):
    whole = str(tmp_path / "whole")
    _preprocess(inputs, whole, bpe_path)
    for count in (3,):
        prefix = str(tmp_path / f"n{count}" / "corpus")
        for index in range(count):
            _preprocess(inputs, prefix, bpe_path, "--shard", f"{index}/{count}")
        shards = [f"{prefix}-{index:05d}-of-{count:05d}" for index in range(count)]
        sizes = [len(file_bytes(shard)[0]) for shard in shards]
        assert sum(size > 0 for size in sizes) >= 2, sizes  # the rows really were spread
        assert merge_main([*shards, "--output-prefix", prefix]) == 0
        assert file_bytes(prefix) == file_bytes(whole), count
    # Negative control: the same shards joined in another order are not the single run's files.
    for index, shard in enumerate(shards):
        for ending in (".bin", ".idx"):
            shutil.copy(shard + ending, str(tmp_path / f"s{index}{ending}"))
    swapped = [str(tmp_path / name) for name in ("s1", "s0", "s2")]
    assert merge_main([*swapped, "--output-prefix", str(tmp_path / "swapped")]) == 0
    assert file_bytes(str(tmp_path / "swapped")) != file_bytes(whole)
    capsys.readouterr()


def test_a_shard_with_no_rows_is_an_empty_pair(tmp_path, bpe_path, capsys):
    write_jsonl(tmp_path / "one.jsonl", ["just one row"])
    prefix = str(tmp_path / "few")
    for index in range(3):
        _preprocess([str(tmp_path / "one.jsonl")], prefix, bpe_path, "--shard", f"{index}/3")
    assert "wrote " + prefix + "-00001-of-00003.bin/.idx: 0 documents, 0 tokens" in capsys.readouterr().out
    shards = [f"{prefix}-{index:05d}-of-00003" for index in range(3)]
    assert merge_main([*shards, "--output-prefix", prefix]) == 0
    _preprocess([str(tmp_path / "one.jsonl")], str(tmp_path / "whole"), bpe_path)
    assert file_bytes(prefix) == file_bytes(str(tmp_path / "whole"))


def test_merge_refuses_missing_misordered_or_mixed_shards(tmp_path, capsys):
    from data.preprocess import write_indexed

    for index in range(3):
        write_indexed([[1, 2], [3]], str(tmp_path / f"c-{index:05d}-of-00003"), vocab_size=500)
    write_indexed([[1, 2]], str(tmp_path / "wide"), vocab_size=70000)
    shard = [str(tmp_path / f"c-{index:05d}-of-00003") for index in range(3)]
    out = str(tmp_path / "out")
    cases = {
        (shard[0], shard[2]): "the 3 shards must be given in order 0..2: shard(s) 1 missing",
        (shard[1], shard[0], shard[2]): "the 3 shards must be given in order 0..2: given in the order [1, 0, 2]",
        (shard[0], str(tmp_path / "wide")): "give the shards of one run only: their names must all end in "
        "-0000I-of-0000N, one N",
        (str(tmp_path / "nothing"),): f"'{tmp_path / 'nothing'}.bin' not found: give the prefixes of finished "
        ".bin/.idx pairs",
    }
    for prefixes, message in cases.items():
        assert merge_main([*prefixes, "--output-prefix", out]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    shutil.copy(shard[0] + ".bin", str(tmp_path / "narrow.bin"))
    shutil.copy(shard[0] + ".idx", str(tmp_path / "narrow.idx"))
    assert merge_main([str(tmp_path / "narrow"), str(tmp_path / "wide"), "--output-prefix", out]) == 2
    assert capsys.readouterr().err == (
        f"error: the inputs hold tokens of different types ({tmp_path / 'narrow'}: uint16, "
        f"{tmp_path / 'wide'}: int32): made with different tokenizers\n"
    )
    assert merge_main([*shard, "--output-prefix", out]) == 0
    assert merge_main([*shard, "--output-prefix", out]) == 2
    assert capsys.readouterr().err.endswith(f"error: {out}.bin/.idx already exist: pass --overwrite to replace them\n")
    assert merge_main([*shard, "--output-prefix", out, "--overwrite"]) == 0
