"""Every input kind of `python -m data.preprocess text` (data/inputs.py): the same rows as jsonl,
jsonl.gz, jsonl.zst, parquet, a folder saved by `datasets` (Dataset and DatasetDict) and a dataset
streamed by `datasets` give byte-identical .bin/.idx files, whose documents are the tokenizer's ids
of each text plus an EOD; bad inputs are one line and exit 2; the progress line and the summary."""

import re

import pytest

from data.parts import Progress
from data.preprocess import main
from tests.helpers.corpora import (
    TEXTS,
    documents,
    file_bytes,
    write_gzip,
    write_jsonl,
    write_parquet,
    write_saved_dataset,
    write_zstd,
)


def _build(tmp_path, name, inputs, bpe_path, *extra):
    prefix = str(tmp_path / "out" / name)
    argv = ["text", "--input", *map(str, inputs), "--tokenizer", bpe_path, "--output-prefix", prefix, *extra]
    assert main(argv) == 0
    return prefix


def test_every_input_kind_gives_the_same_files(tmp_path, bpe_path, expected_documents, capsys):
    jsonl = tmp_path / "rows.jsonl"
    write_jsonl(jsonl, TEXTS, blank_after=10)
    reference = _build(tmp_path, "jsonl", [jsonl], bpe_path, "--part-bytes", "1000")
    summary = capsys.readouterr().out
    assert f"{len(expected_documents)} documents" in summary
    assert summary.rstrip().endswith("left out: 1 empty (no tokens), 1 blank lines"), summary
    assert documents(reference) == expected_documents
    write_gzip(tmp_path / "rows.jsonl.gz", jsonl)
    write_zstd(tmp_path / "rows.jsonl.zst", jsonl)
    write_parquet(tmp_path / "rows.parquet", TEXTS)
    write_saved_dataset(tmp_path / "saved", TEXTS)
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", TEXTS)
    kinds = {
        "gz": [tmp_path / "rows.jsonl.gz"],
        "zst": [tmp_path / "rows.jsonl.zst"],
        "parquet": [tmp_path / "rows.parquet"],
        "saved": [tmp_path / "saved"],
        "dict": [tmp_path / "dict"],
    }
    for name, inputs in kinds.items():
        assert file_bytes(_build(tmp_path, name, inputs, bpe_path, "--part-bytes", "700")) == file_bytes(reference), (
            name
        )
    streamed = str(tmp_path / "out" / "streamed")
    argv = ["text", "--hf-dataset", str(tmp_path / "hub"), "--tokenizer", bpe_path, "--output-prefix", streamed]
    assert main([*argv, "--part-bytes", "500"]) == 0
    assert file_bytes(streamed) == file_bytes(reference)


def test_text_key_names_the_field_or_column(tmp_path, bpe_path, expected_documents, capsys):
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:70], key="content")
    write_parquet(tmp_path / "b.parquet", TEXTS[70:], key="content")
    prefix = _build(
        tmp_path, "keyed", [tmp_path / "a.jsonl", tmp_path / "b.parquet"], bpe_path, "--text-key", "content"
    )
    assert documents(prefix) == expected_documents
    capsys.readouterr()
    argv = ["text", "--input", str(tmp_path / "b.parquet"), "--tokenizer", bpe_path, "--output-prefix"]
    assert main([*argv, str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'b.parquet'}: no column 'text' (columns: id, content): choose the field with --text-key\n"
    )


def _error(tmp_path, capsys, *argv):
    assert main(["text", *argv, "--output-prefix", str(tmp_path / "bad" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())  # nothing left behind
    return err.rstrip("\n")[len("error: ") :]


def test_bad_inputs_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    assert re.fullmatch(
        rf"{bad}: line 3: not a JSON line \(Expecting value: .*\)", _error(tmp_path, capsys, "--input", str(bad))
    )
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"text": "a"}\n["text"]\n')
    assert _error(tmp_path, capsys, "--input", str(listed)) == f"{listed}: line 2: a JSON list, not an object"
    number = tmp_path / "number.jsonl"
    number.write_text('{"text": 5}\n')
    assert _error(tmp_path, capsys, "--input", str(number)) == f"{number}: line 1: field 'text' is int, not a string"
    packed = tmp_path / "broken.jsonl.gz"
    packed.write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert _error(tmp_path, capsys, "--input", str(packed)).startswith(f"input '{packed}' cannot be read as gzip: ")
    compressed = tmp_path / "late.jsonl.gz"
    write_gzip(compressed, bad)
    assert _error(tmp_path, capsys, "--input", str(compressed), "--part-bytes", "5").startswith(
        f"{compressed}: line 3: "
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    assert _error(tmp_path, capsys, "--input", str(folder)) == (
        f"input '{folder}' is a folder but not one saved by datasets' save_to_disk (no state.json): give files or globs"
    )
    write_saved_dataset(tmp_path / "saved", ["x", "y"], num_shards=1)
    assert _error(tmp_path, capsys, "--input", str(tmp_path / "saved"), "--text-key", "body") == (
        f"{tmp_path / 'saved'}: no column 'body' (columns: text, id): choose the field with --text-key"
    )
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("not parquet")
    assert _error(tmp_path, capsys, "--input", str(not_parquet)).startswith(
        f"input '{not_parquet}' cannot be read as parquet: "
    )
    assert _error(tmp_path, capsys, "--input", str(bad), "--shard", "3/3") == (
        "--shard 3/3: expected I/N with 0 <= I < N, e.g. 3/8"
    )


def test_shard_defaults_to_the_slurm_array_task():
    from data.preprocess import parse_shard

    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard(
        None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    ) == (2, 4)
    assert parse_shard("1/4", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}) == (1, 4)


def test_progress_line_has_bytes_per_second_and_eta(capsys):
    progress = Progress(total=4_000_000, enabled=True, interval=0)
    progress.add(1_000_000, 250_000, resumed=True)  # done before: counts as done, not in the rates
    progress.add(1_000_000, 250_000)
    line = capsys.readouterr().err
    assert re.fullmatch(
        r"preprocess: 2\.0/4\.0 MB \(50 %\), [\d.]+ MB/s, [\d,]+ tokens/s, ETA \d+:\d\d:\d\d\n", line
    ), line
    Progress(total=10, enabled=False, interval=0).add(5, 5)
    assert capsys.readouterr().err == ""


def test_saved_dataset_and_parquet_rows_split_exactly_over_parts(tmp_path):
    """Parts of every kind cover each row once: their row ranges tile the input."""
    from data.inputs import find_sources, plan_parts

    write_jsonl(tmp_path / "a.jsonl", TEXTS)
    write_parquet(tmp_path / "b.parquet", TEXTS)
    write_saved_dataset(tmp_path / "c", TEXTS)
    sources = find_sources([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c")])
    for shards in (1, 2, 5):
        parts = [part for shard in range(shards) for part in plan_parts(sources, (shard, shards), 900)]
        for kind, stop in (("jsonl", (tmp_path / "a.jsonl").stat().st_size), ("parquet", 10)):
            ranges = [(p.start, p.stop) for p in parts if p.kind == kind]
            assert (
                ranges[0][0] == 0 and ranges[-1][1] == stop and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            ), (kind, shards, ranges)
        rows = sum(p.stop - p.start for p in parts if p.kind == "saved")
        assert rows == len(TEXTS)
        for shard in range(shards):  # a shard's part names sort in its output order
            names = [part.name for part in plan_parts(sources, (shard, shards), 900)]
            assert names == sorted(set(names))


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    """A tokenizer bug is caught before a wrong id is stored (uint16 would wrap 70000 to 4464)."""
    from common.errors import UserError
    from data.parts import WorkerSetup, flatten

    class Tokenizer:
        vocab_size, eod = 300, 0

    setup = WorkerSetup(Tokenizer(), "broken", "text", str(tmp_path), "uint16")
    flat, lengths = flatten([[1, 299], [], [5]], setup)
    assert flat.tolist() == [1, 299, 0, 5, 0] and flat.dtype.name == "uint16" and lengths == [3, 2]
    for bad in (300, 70000):
        with pytest.raises(UserError) as error:
            flatten([[1, bad]], setup)
        assert str(error.value) == f"tokenizer 'broken' produced id {bad} outside its vocabulary of 300 ids"
