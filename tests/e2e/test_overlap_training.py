"""Communication overlap (parallel.overlap_*) changes when gradients and weights travel, never the
math: each setting, on and off, reproduces the one-process curve.

The layout tests (test_layouts.py, test_fsdp_training.py, ...) run with the defaults, i.e. with
every overlap on wherever it applies; these runs add small buckets (many in flight at once), each
overlap switched off. A resume from a checkpoint saved while the distributed optimizer's all-gather
was left to the next forward: test_checkpoint.py's dp2-to-dp1-distopt-dp-reshardable. That the
settings reach megatron-core: tests/unit/test_recipe.py and tests/distributed/test_overlap.py."""

import pytest

from tests.helpers.runs import (
    MASKED,
    assert_close_curves,
    assert_close_validation,
    read_metrics,
    run_pretrain,
    tiny_overrides,
)

FP32_REL = 1e-5  # as tests/e2e/test_layouts.py: fp32 layouts reorder additions only
SMALL_BUCKETS = ["parallel.bucket_size=20000"]  # tiny_gpt's ~190k parameters: about 10 buckets

SETTINGS = {
    # name: (processes, overrides, the overlaps the run says it has)
    # overlapped all-reduce, many buckets in flight
    "dp2-small-buckets": (2, SMALL_BUCKETS, "gradient reduce"),
    # overlapped reduce-scatter, and the weights all-gathered bucket by bucket by the next forward
    "dp2-distopt-small-buckets": (
        2,
        ["parallel.distributed_optimizer=true", *SMALL_BUCKETS],
        "gradient reduce, parameter all-gather",
    ),
    # every overlap switched off, where each would apply (the layout tests run them on)
    "pp2-vpp2-dp2-distopt-all-off": (
        4,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.distributed_optimizer=true"]
        + ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]
        + ["parallel.overlap_p2p_comm=false"],
        "none",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_overlap_setting_reproduces_single_process(name, masked_reference, synthetic_corpus, tmp_path):
    nproc, extra, said = SETTINGS[name]
    proc = run_pretrain(nproc, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *MASKED, *extra))
    assert f"communication overlap: {said}\n" in proc.stdout
    actual = read_metrics(tmp_path)
    assert_close_curves(actual, masked_reference, rel=FP32_REL)
    assert_close_validation(actual, masked_reference, rel=FP32_REL)
