"""End-to-end training: golden losses, data-parallel equivalence, exact resume, outputs."""

import json
import math
import pathlib

import pytest

from tests.helpers.runs import TINY_STEPS, assert_close_curves, read_metrics, run_pretrain, tiny_overrides

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "tiny_gpt_fp32.json"
STEPS = TINY_STEPS
# fp32 on CPU: a different layout only changes the reduction order of identical numbers.
REL = 1e-5


def test_reference_matches_golden_losses(reference, update_golden):
    _, metrics = reference
    curve = [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in metrics]
    if update_golden:
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert_close_curves(curve, golden, rel=1e-4)


def test_loss_goes_down(reference):
    _, metrics = reference
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0


def test_metrics_and_checkpoint_are_written(reference):
    log_dir, metrics = reference
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "consumed_tokens", "tokens_per_s", "step_time_s"):
        assert all(isinstance(r[key], float) or isinstance(r[key], int) for r in metrics), key
    assert metrics[-1]["consumed_tokens"] == STEPS * 8 * 128
    # lr: linear warmup over 5 steps from lr/5, then cosine decay.
    assert metrics[0]["lr"] == pytest.approx(3e-3 / 5)
    assert metrics[4]["lr"] == pytest.approx(3e-3)
    assert metrics[5]["lr"] < 3e-3
    ckpt = log_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    assert (ckpt / f"iter_{STEPS:07d}" / "metadata.json").is_file()
    assert not list(ckpt.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["data.num_workers=2"],
        ["parallel.distributed_optimizer=true"],
        ["parallel.distributed_optimizer=true", "checkpoint.optimizer_format=dp_reshardable"],
    ],
    ids=["dp2-loader-workers", "dp2-distopt", "dp2-distopt-dp-reshardable"],
)
def test_dp2_and_auto_resume_reproduce_single_process(reference, synthetic_corpus, tmp_path, extra):
    """Two gloo processes, stopped at step 5 and resumed with checkpoint.load=auto: the one
    metrics.jsonl holds the reference curve. With the distributed optimizer this also catches
    megatron-core's torch-Adam `step` reload drift (pretrain/checkpoint/storage.py); with loader workers,
    that they read from the resumed step on."""
    _, expected = reference
    half = STEPS // 2
    run_pretrain(2, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *extra) + [f"train.steps={half}"])
    proc = run_pretrain(2, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *extra, "checkpoint.load=auto"))
    assert f"resumed from {tmp_path / 'checkpoints' / f'iter_{half:07d}'} at step {half}" in proc.stdout
    assert_close_curves(read_metrics(tmp_path), expected, rel=REL)


VALIDATION = ["train.eval_interval=5", "train.eval_steps=2"]


@pytest.fixture(scope="module")
def pipeline_with_validation(synthetic_corpus, tmp_path_factory):
    """tiny_gpt on 2 pipeline stages with a validation every 5 steps."""
    log_dir = tmp_path_factory.mktemp("pp2_validation")
    overrides = tiny_overrides(
        synthetic_corpus, log_dir, *VALIDATION, f"data.valid_path={synthetic_corpus}", "parallel.pipeline=2"
    )
    run_pretrain(2, "tiny_gpt", overrides)
    return read_metrics(log_dir)


def _validations(metrics):
    return [{"step": r["step"], "val_loss": r["val_loss"]} for r in metrics if "val_loss" in r]


@pytest.mark.slow
def test_validation_is_forward_only_and_pipeline_ready(reference, pipeline_with_validation):
    _, expected = reference
    metrics = pipeline_with_validation
    assert_close_curves(metrics, expected, rel=REL)  # evaluating changes nothing in training
    assert [r["step"] for r in metrics if "val_loss" in r] == [5, 10]
    for r in metrics:
        if "val_loss" in r:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    assert _validations(metrics)[1]["val_loss"] < _validations(metrics)[0]["val_loss"]


def test_test_share_is_evaluated_after_the_last_step(synthetic_corpus, tmp_path):
    """train.test_at_end: test_loss / test_ppl in the last record only, beside the validation of
    the same step, from other documents than the validation's."""
    steps = [
        "train.steps=4",
        "train.eval_interval=2",
        "train.eval_steps=1",
        "train.test_at_end=true",
        "data.split=80,10,10",
    ]
    proc = run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path) + steps)
    metrics = read_metrics(tmp_path)
    assert [r["step"] for r in metrics if "test_loss" in r] == [4]
    assert [r["step"] for r in metrics if "val_loss" in r] == [2, 4]
    last = metrics[-1]
    assert math.isfinite(last["test_loss"]) and last["test_loss"] != last["val_loss"]
    assert last["test_ppl"] == pytest.approx(math.exp(last["test_loss"]), rel=1e-12)
    assert f"test_loss {last['test_loss']:.4f}" in proc.stdout


@pytest.mark.slow
def test_resume_at_another_data_parallel_size(reference, synthetic_corpus, pipeline_with_validation, tmp_path):
    """Stopped at step 5 on 2 data-parallel ranks, resumed on 1 (same global batch): the samples
    continue at consumed_samples, so the curve is the uninterrupted one, and validation after the
    resume sees what a pipeline-parallel run sees."""
    _, expected = reference
    half = STEPS // 2
    valid = [*VALIDATION, f"data.valid_path={synthetic_corpus}"]
    run_pretrain(2, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *valid) + [f"train.steps={half}"])
    proc = run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *valid, "checkpoint.load=auto"))
    assert "layout: world 1" in proc.stdout and f"at step {half}" in proc.stdout
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, expected, rel=REL)
    assert_close_curves(_validations(metrics), _validations(pipeline_with_validation), rel=REL, keys=("val_loss",))


def test_a_written_recipe_reproduces_its_run(reference, synthetic_corpus, tmp_path):
    """Every run writes its resolved recipe to <logging.dir>/recipe.yaml; a run started from that
    file alone (a new logging.dir aside) trains the same curve, bit for bit."""
    log_dir, expected = reference
    written = log_dir / "recipe.yaml"
    assert written.read_text().startswith("# resolved from ")
    run_pretrain(1, str(written), [f"logging.dir={tmp_path}"])
    assert [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path)] == [
        (r["loss"], r["grad_norm"]) for r in expected
    ]


def test_print_recipe_shows_every_key_and_default(synthetic_corpus):
    import yaml

    from common import schema
    from pretrain.recipe import Recipe, load_recipe

    proc = run_pretrain(1, "tiny_gpt", ["--print-recipe", "train.steps=7"])
    printed = yaml.safe_load(proc.stdout)

    def keys(tree, prefix=""):
        return [
            k
            for name, v in tree.items()
            for k in ([f"{prefix}{name}"] + (keys(v, f"{prefix}{name}.") if isinstance(v, dict) else []))
        ]

    assert keys(printed) == schema.all_keys(Recipe)
    assert printed["train"]["steps"] == 7 and printed["model"]["num_layers"] == 4  # override, recipe
    assert printed["model"]["moe"]["top_k"] == 2  # a default the recipe does not name
    assert printed == schema.to_dict(load_recipe("tiny_gpt", ["train.steps=7"]))
