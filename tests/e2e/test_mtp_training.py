"""Multi-token prediction in training (model/mtp.py): tiny_gpt with one MTP module at pipeline 2 ×
tensor 2 (sequence parallel), where the MTP module sits on the last stage with its own copy of the
embedding (megatron-core syncs it with the first stage's at build and sums their gradients) and its
projection is split over the tensor ranks, reproduces the one-process curve: loss, MTP loss and
gradient norm. The MTP loss and its gradient themselves are checked against the paper's formula in
tests/unit/test_mtp.py (on tiny_deepseek's MLA and MoE layers); by hand (2026-12-07) tiny_deepseek with
its MTP module at pipeline 2 and at expert 2 gave the one-process curve to the last digit (its MLA at
tensor 2 differs by 2.4e-5 at step 1 with MTP off too: not MTP's).

Negative control (by hand, 2026-12-07, this corpus, tiny_deepseek): with mtp_loss_scaling_factor 0
the gradient norm of step 1 is 2.0447 instead of 2.1834, so MTP's gradient is in the compared curve; a
layout that lost it (or the embedding copy's share) would differ by far more than the bound."""

import pytest

from tests.helpers.runs import assert_close_curves, read_metrics, run_pretrain, tiny_overrides

STEPS = 3


@pytest.mark.slow
def test_mtp_at_pipeline_2_tensor_2_reproduces_one_process(synthetic_corpus, tmp_path):
    """The 4-rank run also saves (its last stage's embedding copy is tied to the first stage's in the
    checkpoint: before, the save raised a TypeError after training) and one process resumes it for
    one more step, which must be the one-process run's last step."""
    curves = {}
    mtp = ["model.mtp_num_layers=1", "model.mtp_loss_scaling_factor=0.3"]
    for nproc, layout in (
        (1, [f"train.steps={STEPS + 1}", "checkpoint.save=false"]),
        (4, ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true", f"train.steps={STEPS}"]),
    ):
        log_dir = tmp_path / f"world{nproc}"
        proc = run_pretrain(nproc, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir, *mtp, *layout))
        curves[nproc] = read_metrics(log_dir)
        assert f"| loss {curves[nproc][-1]['loss']:.4f} | mtp_loss " in proc.stdout  # beside the LM loss
    assert all(r["mtp_loss"] > 1.0 for r in curves[1]), curves[1]
    assert_close_curves(curves[4], curves[1][:STEPS], rel=1e-5, keys=("loss", "mtp_loss", "grad_norm"))
    resume = [*mtp, f"train.steps={STEPS + 1}", "checkpoint.load=auto", "checkpoint.save=false"]
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path / "world4", *resume))
    resumed = read_metrics(tmp_path / "world4")[-1:]
    assert_close_curves(resumed, curves[1][-1:], rel=1e-5, keys=("loss", "mtp_loss", "grad_norm"))
