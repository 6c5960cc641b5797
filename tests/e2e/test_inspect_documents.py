"""python -m tools.inspect_data under data.reset_attention_mask / reset_position_ids: each sample's line
names the document spans its attention stays inside, which end at the sample's EODs."""

import pytest

from tests.helpers.warm import run_python

EOD = 256  # the byte tokenizer's


@pytest.mark.slow
def test_inspect_shows_the_document_spans_of_a_step(short_document_corpus, tmp_path):
    cmd = ["-m", "tools.inspect_data", "--recipe", "tiny_gpt", "--step", "2", "--micro-batch", "0"]
    keys = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
    proc = run_python(cmd + [f"data.path={short_document_corpus}", f"logging.dir={tmp_path}", *keys], timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    spans = [line for line in lines if line.startswith("attention inside ")]
    assert len(spans) == 2, proc.stdout  # micro-batch 0: two samples
    assert all(line.endswith("; positions restart at each") for line in spans)

    from data.tokenizer import ByteTokenizer
    from pretrain.recipe import load_recipe
    from pretrain.trainer import build_data
    from tools.inspect_data import step_samples

    recipe = load_recipe("tiny_gpt", [f"data.path={short_document_corpus}", f"logging.dir={tmp_path}", *keys])
    views = list(step_samples(build_data(recipe, ByteTokenizer())["train"], 8, 2, 1, 2))[:2]
    for view, line in zip(views, spans):
        assert view.spans is not None and line.startswith(f"attention inside {len(view.spans)} documents")
        # each span but the last ends just after an EOD of the input tokens, and only there
        ends = [b for a, b in view.spans[:-1]]
        assert ends == [i + 1 for i, t in enumerate(view.tokens[:-1]) if t == EOD and i + 1 < len(view.tokens) - 1]
        assert len(view.spans) > 2
