"""optimizer.cpu_offload (megatron-core's HybridDeviceOptimizer): the optimizer state and step of
a share of the parameters on the host changes nothing in the curve, with the plain optimizer
(fp32) and with the distributed optimizer (fp32, DP 2), through a resume with offload. On a CPU the host is the device, but the
same path runs: host copies of the parameters, gradients copied to them, torch's AdamW stepping
them, the results copied back (upstream/host_optimizer.py offload.device_params), and resumes with
offload load the saved state (upstream/host_optimizer.py's two fixes).

Measured (2026-12-07): both equal their non-offloaded curves to the printed digit. Negative
control (by hand): with the host copies' results not copied back (the parameters never move) the
loss at step 2 is 5.5437 instead of 5.4286; that is what a missing copy looked like while building
this (the host copies were themselves taken for device tensors and stepped in place of them)."""

import pytest

from tests.helpers.runs import assert_close_curves, read_metrics, run_pretrain, tiny_overrides

REL = 1e-5


@pytest.mark.slow
def test_offloaded_half_of_the_state_trains_the_same_curve_and_resumes(reference, synthetic_corpus, tmp_path):
    """Its step-5 checkpoint resumed with offload continues the curve (upstream/host_optimizer.py's
    fixes: without them the resume raises TypeError, then KeyError)."""
    offload = ["optimizer.cpu_offload=true", "optimizer.offload_fraction=0.5"]
    out = run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *offload, "train.steps=5")).stdout
    # 0.5 by element count, whole parameters in order: the first ones past half of the 234048
    assert "optimizer: AdamW for every parameter; 120832 of 234048 elements stepped on the host" in out
    out = run_pretrain(
        1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *offload, "checkpoint.load=auto")
    ).stdout
    assert "at step 5" in out
    assert_close_curves(read_metrics(tmp_path), reference[1], rel=REL)


@pytest.mark.slow
def test_offload_under_the_distributed_optimizer_trains_the_same_curve_and_resumes(
    reference, synthetic_corpus, tmp_path
):
    """fp32, DP 2: offloaded for 2 steps, saved, resumed offloaded to step 4, on the one-process
    curve (upstream/host_optimizer.py's fixes: without the leaf shards the build raises "can't
    optimize a non-leaf Tensor"; without the refresh of the host copies the resumed run steps stale
    copies, loss 5.2074 vs 4.9359 in bf16 at one process). bf16 with the distributed optimizer (by
    hand, 2026-12-07) equals its non-offloaded run to the printed digit, resumed too."""
    offload = ("parallel.distributed_optimizer=true", "optimizer.cpu_offload=true")
    out = run_pretrain(2, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *offload, "train.steps=2")).stdout
    assert "117056 of 117056 elements stepped on the host" in out  # rank 0's half of the shards
    out = run_pretrain(
        2, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *offload, "train.steps=4", "checkpoint.load=auto")
    ).stdout
    assert "at step 2" in out
    assert_close_curves(read_metrics(tmp_path), reference[1][:4], rel=REL)
