"""data/parts.py: resuming `data.preprocess text` in one process: a run stopped after some parts, rerun with the same
command, tokenizes only the parts not done and writes the uninterrupted run's exact bytes; a torn
part is redone; a finished output or another run's parts are not overwritten without --overwrite.
(tests/e2e/test_preprocess_kill.py does the same with real SIGKILLs.)"""

import os

import pytest

import data.parts
from data.preprocess import main
from tests.helpers.corpora import TEXTS, file_bytes, write_jsonl


@pytest.fixture
def command(tmp_path, bpe_path):
    write_jsonl(tmp_path / "rows.jsonl", TEXTS)
    inputs = ["--input", str(tmp_path / "rows.jsonl"), "--tokenizer", bpe_path, "--part-bytes", "600"]
    return lambda prefix, *extra: ["text", *inputs, "--output-prefix", str(prefix), *extra]


TOKENIZE_PART = data.parts.tokenize_part


class Interrupted(BaseException):
    """Stands for Ctrl-C (pytest reserves KeyboardInterrupt for its own stop)."""


def _record_calls(monkeypatch, stop_after=None):
    """Replace tokenize_part by one that logs the parts it is asked for (and interrupts the run once
    `stop_after` parts are done)."""
    calls = []

    def tokenize_part(part, setup=None):
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupted
        calls.append(part.name)
        return TOKENIZE_PART(part, setup)

    monkeypatch.setattr(data.parts, "tokenize_part", tokenize_part)
    return calls


def test_rerun_finishes_only_the_parts_not_done(tmp_path, command, monkeypatch, capsys):
    assert main(command(tmp_path / "whole")) == 0
    everything = _record_calls(monkeypatch)
    assert main(command(tmp_path / "again")) == 0
    first = _record_calls(monkeypatch, stop_after=4)
    with pytest.raises(Interrupted):
        main(command(tmp_path / "out"))
    parts = tmp_path / "out.parts"
    assert sorted(p.name for p in parts.glob("*.json")) == sorted([f"{n}.json" for n in first] + ["plan.json"])
    assert not (tmp_path / "out.bin").exists()
    # a torn part (a .bin shorter than its record, e.g. after a machine crash) is done again
    torn = parts / f"{first[-1]}.bin"
    torn.write_bytes(torn.read_bytes()[:-2])
    capsys.readouterr()
    second = _record_calls(monkeypatch)
    assert main(command(tmp_path / "out")) == 0
    assert second == [first[-1]] + everything[4:]  # the three good parts were not tokenized again
    assert capsys.readouterr().out.rstrip().endswith(f"resumed: 3 of {len(everything)} parts were done before")
    assert file_bytes(str(tmp_path / "out")) == file_bytes(str(tmp_path / "whole"))
    assert not parts.exists()
    # Negative control: the comparison sees a one-token difference in a part kept from before.
    first = _record_calls(monkeypatch, stop_after=2)
    with pytest.raises(Interrupted):
        main(command(tmp_path / "changed"))
    kept = tmp_path / "changed.parts" / f"{first[0]}.bin"
    ids = bytearray(kept.read_bytes())
    ids[0] ^= 1
    kept.write_bytes(bytes(ids))
    _record_calls(monkeypatch)
    assert main(command(tmp_path / "changed")) == 0
    assert file_bytes(str(tmp_path / "changed")) != file_bytes(str(tmp_path / "whole"))


def test_finished_output_and_other_runs_parts_need_overwrite(tmp_path, command, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(command(out)) == 0
    mtime = os.stat(f"{out}.bin").st_mtime_ns
    capsys.readouterr()
    assert main(command(out)) == 2
    assert capsys.readouterr().err == f"error: {out}.bin/.idx already exist: pass --overwrite to replace them\n"
    assert os.stat(f"{out}.bin").st_mtime_ns == mtime
    assert main(command(out, "--overwrite")) == 0
    _record_calls(monkeypatch, stop_after=2)
    with pytest.raises(Interrupted):
        main(command(tmp_path / "half"))
    capsys.readouterr()
    assert main(command(tmp_path / "half", "--text-key", "id")) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'half'}.parts holds the parts of another run (its text_key differ): rerun that "
        "command to finish it, or pass --overwrite to start this one\n"
    )
    _record_calls(monkeypatch)
    assert main(command(tmp_path / "half", "--overwrite")) == 0
    assert file_bytes(str(tmp_path / "half")) == file_bytes(str(out))
