"""tools.inspect_data reports the samples a step trained on: the model checkpointed after step 2 has, on
the samples inspect gives for step 3, exactly the loss metrics.jsonl logged for step 3 (and not on
step 2's samples); each sample's tokens are a window of the documents it names; the command line
filters by data rank and micro-batch; bad input is one line."""

import math
import subprocess

import numpy
import pytest
import torch

from tests.helpers.runs import read_metrics, run_pretrain, tiny_overrides
from tests.helpers.warm import run_python

GLOBAL_BATCH, MICRO_BATCH = 8, 2  # tiny_gpt's


@pytest.fixture(scope="module")
def run_dir(synthetic_corpus, tmp_path_factory):
    """tiny_gpt trained 3 steps in one process, with a checkpoint after step 2."""
    log_dir = tmp_path_factory.mktemp("inspected")
    overrides = tiny_overrides(synthetic_corpus, log_dir, "train.steps=3", "checkpoint.interval=2")
    run_pretrain(1, "tiny_gpt", overrides)
    assert (log_dir / "checkpoints" / "iter_0000002").is_dir()
    return log_dir


def _views(run_dir, step: int, dp_size: int) -> list:
    from data.tokenizer import ByteTokenizer
    from pretrain.recipe import load_recipe
    from pretrain.trainer import build_data
    from tools.inspect_data import step_samples

    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    samples = build_data(recipe, ByteTokenizer())["train"]
    return list(step_samples(samples, GLOBAL_BATCH, MICRO_BATCH, dp_size, step))


def _loss(run_dir, views) -> float:
    """Token-mean loss of the step-2 checkpoint's model on the views' tokens (fp32, one process)."""
    from model.gpt import ModelBuild, build_model_chunks
    from pretrain.checkpoint import storage
    from pretrain.recipe import load_recipe

    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    (model,) = build_model_chunks(recipe.model, ModelBuild(perform_initialization=False), 257)
    storage.load(run_dir / "checkpoints" / "iter_0000002", [model], None)
    tokens = torch.tensor([v.tokens for v in views])
    s = tokens.size(1) - 1
    with torch.no_grad():
        losses = model.eval()(tokens[:, :-1], torch.arange(s).expand(len(views), s), None, labels=tokens[:, 1:])
    assert all(v.loss_tokens == s for v in views)  # no EOD masking in this run: every token counts
    return float(losses.double().mean())


@pytest.mark.usefixtures("megatron_single_process")
def test_step_samples_are_what_the_step_trained_on(run_dir):
    logged = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    step3 = _views(run_dir, 3, dp_size=2)  # the global batch, whichever data-parallel size read it
    # rank r's micro-batch m: samples 16 + (m·2 + r)·2 and the next (data/loader.py)
    assert [(v.index, v.data_rank, v.micro_batch) for v in step3[::2]] == [
        (16, 0, 0),
        (20, 0, 1),
        (18, 1, 0),
        (22, 1, 1),
    ]
    assert sorted(v.index for v in step3) == list(range(16, 24))
    assert math.isclose(_loss(run_dir, step3), logged[3], rel_tol=1e-5)
    # negative control: the neighbouring step's samples give another loss
    assert not math.isclose(_loss(run_dir, _views(run_dir, 2, dp_size=2)), logged[3], rel_tol=1e-3)


def test_tokens_are_a_window_of_the_named_documents(run_dir, synthetic_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = IndexedDataset(synthetic_corpus)
    views = _views(run_dir, 5, dp_size=1)
    assert any(len(v.documents) > 1 for v in views)
    for view in views:
        assert view.dataset == synthetic_corpus
        text = numpy.concatenate([corpus.get(d) for d in view.documents]).tolist()
        starts = [i for i in range(len(corpus.get(view.documents[0]))) if text[i : i + len(view.tokens)] == view.tokens]
        assert starts, (view.index, view.documents)
        # the window ends inside the last document named (no document more than needed)
        assert starts[0] + len(view.tokens) > len(text) - len(corpus.get(view.documents[-1]))


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return run_python(["-m", "tools.inspect_data", *args], timeout=300)


def test_command_line_filters_rank_and_micro_batch(run_dir):
    recipe = str(run_dir / "recipe.yaml")
    proc = _inspect("--recipe", recipe, "--step", "3", "--world-size", "2", "--data-rank", "1", "--micro-batch", "1")
    assert proc.returncode == 0, proc.stderr
    headers = [line for line in proc.stdout.splitlines() if line.startswith("--- sample")]
    assert [h.split(":")[0] for h in headers] == [
        "--- sample 22 (data rank 1, micro-batch 1)",
        "--- sample 23 (data rank 1, micro-batch 1)",
    ]
    bad = _inspect("--recipe", recipe, "--step", "3", "--world-size", "2", "--data-rank", "2")
    assert bad.returncode == 2 and bad.stderr == "error: --data-rank 2 is outside [0, 2): the data-parallel size\n"
