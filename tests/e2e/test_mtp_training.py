"""Multi-token prediction in training (model/mtp.py): tiny_gpt with one MTP module at pipeline 2 ×
tensor 2 (sequence parallel), where the MTP module sits on the last stage with its own copy of the
embedding (megatron-core syncs it with the first stage's at build and sums their gradients) and its
projection is split over the tensor ranks, reproduces the one-process curve: loss, MTP loss and
gradient norm. The MTP loss and its gradient themselves are checked against the paper's formula in
tests/unit/test_mtp.py (on tiny_deepseek's MLA and MoE layers); by hand (2026-12-07) tiny_deepseek with
its MTP module at pipeline 2 and at expert 2 gave the one-process curve to the last digit (its MLA at
tensor 2 differs by 2.4e-5 at step 1 with MTP off too: not MTP's).

The pipeline run saves a checkpoint at its end (before the fix in parallel/data_parallel.py:
sharded_state_dict, TypeError: 'NoneType' object is not subscriptable at gpt_model.py:842); by hand
(2026-12-07) that checkpoint, saved at step 2, resumed on one process continues the one-process curve
to step 4 within 1e-7.

Negative control (by hand, 2026-12-07, this corpus, tiny_deepseek): with mtp_loss_scaling_factor 0
the gradient norm of step 1 is 2.0447 instead of 2.1834, so MTP's gradient is in the compared curve; a
layout that lost it (or the embedding copy's share) would differ by far more than the bound."""

import pytest

from tests.helpers.runs import assert_close_curves, read_metrics, run_pretrain, tiny_overrides

STEPS = 3


@pytest.mark.slow
def test_mtp_at_pipeline_2_tensor_2_reproduces_one_process(synthetic_corpus, tmp_path):
    curves = {}
    for nproc, layout in (
        (1, ["checkpoint.save=false"]),
        # saves at the end: the last stage's MTP embedding copy needs the data-parallel group megatron-core
        # reads from the caller's metadata (parallel/data_parallel.py:sharded_state_dict)
        (4, ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ):
        log_dir = tmp_path / f"world{nproc}"
        extra = ["model.mtp_num_layers=1", "model.mtp_loss_scaling_factor=0.3", *layout, f"train.steps={STEPS}"]
        proc = run_pretrain(nproc, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir, *extra))
        curves[nproc] = read_metrics(log_dir)
        assert f"| loss {curves[nproc][-1]['loss']:.4f} | mtp_loss " in proc.stdout  # beside the LM loss
    assert all(r["mtp_loss"] > 1.0 for r in curves[1]), curves[1]
    assert_close_curves(curves[4], curves[1], rel=1e-5, keys=("loss", "mtp_loss", "grad_norm"))
