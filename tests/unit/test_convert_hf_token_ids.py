"""tools/convert_hf.py's bos/eos ids, which no tensor holds: import keeps the HF folder's (config.json
and generation_config.json, what transformers' `generate` stops at), export writes them back, else
the end-of-document id of the checkpoint recipe's data.tokenizer, else null (said). Whole import ->
export round trips against transformers: tests/e2e/test_convert_hf.py."""

import json

import pytest

from common.errors import UserError
from tools.convert_hf import export_token_ids, hf_token_ids


def _recipe(tokenizer: str) -> dict:
    return {"recipe": {"model": {}, "data": {"tokenizer": tokenizer}}}


def test_import_keeps_config_and_generation_ids(tmp_path):
    config = {"bos_token_id": 128000, "eos_token_id": 128001, "vocab_size": 8}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    kept = hf_token_ids(tmp_path, config)
    assert kept == {
        "config": {"bos_token_id": 128000, "eos_token_id": 128001},
        "generation": {"eos_token_id": [128001, 128008, 128009]},
    }
    assert export_token_ids({"hf_token_ids": kept} | _recipe("byte")) == (kept["config"], kept["generation"])
    # no generation_config.json: generate's ids are config.json's
    (tmp_path / "generation_config.json").unlink()
    kept = hf_token_ids(tmp_path, config)
    assert export_token_ids({"hf_token_ids": kept}) == (kept["config"], kept["config"])


def test_bad_generation_config_is_a_one_line_error(tmp_path):
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"generation_config.json: expected a JSON object, got list$"):
        hf_token_ids(tmp_path, {})


def test_trained_checkpoint_ids_come_from_its_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a")).save(str(path))
    assert export_token_ids(_recipe(str(path))) == ({"bos_token_id": None, "eos_token_id": 2},) * 2
    assert export_token_ids(_recipe("byte"))[0] == {"bos_token_id": None, "eos_token_id": 256}
    assert capsys.readouterr().out == ""
    missing = str(tmp_path / "gone" / "tokenizer.json")
    assert export_token_ids(_recipe(missing))[0] == {"bos_token_id": None, "eos_token_id": None}
    assert (
        capsys.readouterr().out
        == f"config.json: eos_token_id null: data.tokenizer '{missing}' is not on this machine\n"
    )
