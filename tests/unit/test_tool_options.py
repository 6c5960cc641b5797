"""Tool options that would do nothing in the combination given are refused in one line (tools/generate.py:
a sampling filter with greedy decoding; data/preprocess.py: a hub dataset's configuration without the
hub dataset), before anything is loaded."""

import pytest

from common.errors import UserError


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--top-k", "40"],
            "--top-k 40 filter sampling, which --temperature 0 (greedy: the most likely id) does not do: leave "
            "them out, or give a temperature above 0",
        ),
        (
            ["--top-k", "5", "--top-p", "0.9"],
            "--top-k 5 and --top-p 0.9 filter sampling, which --temperature 0 (greedy: the most likely id) does "
            "not do: leave them out, or give a temperature above 0",
        ),
    ],
)
def test_generate_refuses_filters_with_greedy_decoding(options, message):
    from tools.generate import check_args, parse_args

    with pytest.raises(UserError) as err:
        check_args(parse_args(["--checkpoint", "c", "--prompt", "p", "--temperature", "0", *options]))
    assert str(err.value) == message
    check_args(parse_args(["--checkpoint", "c", "--prompt", "p", "--temperature", "0.7", *options]))  # sampled
    check_args(parse_args(["--checkpoint", "c", "--prompt", "p", "--temperature", "0"]))  # greedy alone


def test_preprocess_refuses_a_subset_without_a_hub_dataset(tmp_path, capsys):
    from data.preprocess import main

    (tmp_path / "a.txt").write_text("some text")
    argv = ["text", "--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "out")]
    assert main([*argv, "--hf-subset", "en"]) == 2
    assert capsys.readouterr().err == (
        "error: --hf-subset en is a configuration of a hub dataset: give --hf-dataset NAME\n"
    )
    assert not (tmp_path / "out.bin").exists()
    assert main(argv) == 0  # the same command without it
