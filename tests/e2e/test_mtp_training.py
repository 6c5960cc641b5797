"""Multi-token prediction in training (model/mtp.py): tiny_deepseek (MLA, group-limited routing, one
MTP module weighted 0.3) at pipeline 2, where the MTP module sits on the last stage with its own copy
of the embedding (megatron-core syncs it with the first stage's at build and sums their gradients),
reproduces the one-process curve: loss, MTP loss and gradient norm. The MTP loss and its gradient
themselves are checked against the paper's formula in tests/unit/test_mtp.py.

Negative control (by hand, 2026-12-07, this corpus): with mtp_loss_scaling_factor 0 the gradient norm
of step 1 is 2.0447 instead of 2.1834, so MTP's gradient is in the compared curve; a pipeline run that
lost it (or the embedding copy's share) would differ by far more than the bound."""

import pytest

from tests.helpers.runs import assert_close_curves, read_metrics, run_pretrain, tiny_overrides

STEPS = 4


@pytest.mark.slow
def test_mtp_at_pipeline_2_reproduces_one_process(synthetic_corpus, tmp_path):
    curves = {}
    for pipeline in (1, 2):
        log_dir = tmp_path / f"pp{pipeline}"
        extra = [f"parallel.pipeline={pipeline}", f"train.steps={STEPS}", "checkpoint.save=false"]
        run_pretrain(pipeline, "tiny_deepseek", tiny_overrides(synthetic_corpus, log_dir, *extra))
        curves[pipeline] = read_metrics(log_dir)
    assert all(r["mtp_loss"] > 1.0 for r in curves[1]), curves[1]
    assert_close_curves(curves[2], curves[1], rel=1e-5, keys=("loss", "mtp_loss", "grad_norm"))
