import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from upstream.process import prepare_process

prepare_process()  # as every entry point does: megatron-core without TorchDynamo on CPU, its fixes applied

pytest_plugins = ["tests.helpers.slurm", "tests.helpers.corpora"]  # slurm_cluster; bpe_path, expected_documents


# In CI (CI=true) a test that skips fails the run: its prerequisite (root, apt, Slurm, network
# namespaces, shellcheck, transformers) must be there. The only tests that may skip are those that
# cannot run on the CI machine at all: the ones marked `gpu` (README, "Tests"). A strict xfail is not a
# skip: it ran, and it fails the run the day it passes (a target not met yet, kept visible).
CI = os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail") and "gpu" not in item.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), where only tests marked gpu may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while it is collected (`pytest.importorskip` at the top of
    a module, e.g. transformers for every outside-reference test): no test of it runs, so the hook
    above never sees them."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped in CI (CI=true), where only tests marked gpu may skip: {reason}"


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA: without it they are skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/golden/*.json from this run instead of comparing"
    )


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session")
def short_document_corpus(tmp_path_factory) -> str:
    """Documents of 4 to 40 tokens: about six to a 128-token sample (document masking's tests)."""
    from data.preprocess import build_synthetic_corpus

    prefix = str(tmp_path_factory.mktemp("short-documents") / "text_document")
    build_synthetic_corpus(prefix, num_docs=3000, seed=1, lengths=(4, 40))
    return prefix


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> str:
    """The trainer tests' corpus: deterministic on every machine (not the stdlib text)."""
    from data.preprocess import build_synthetic_corpus

    prefix = str(tmp_path_factory.mktemp("corpus") / "text_document")
    build_synthetic_corpus(prefix, num_docs=2000, seed=0)
    return prefix


@pytest.fixture(scope="session")
def reference(synthetic_corpus, tmp_path_factory):
    """tiny_gpt, one process, fp32: the curve every other layout must reproduce."""
    from tests.helpers.runs import read_metrics, run_pretrain, tiny_overrides

    log_dir = tmp_path_factory.mktemp("reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir))
    return log_dir, read_metrics(log_dir)


@pytest.fixture(scope="session")
def masked_reference(synthetic_corpus, tmp_path_factory):
    """tiny_gpt, one process, fp32, with tests.helpers.runs.MASKED: unequal loss-token counts per
    micro-batch and rank, validation at steps 5 and 10. The curve layouts and resumes must reproduce."""
    from tests.helpers.runs import MASKED, read_metrics, run_pretrain, tiny_overrides

    log_dir = tmp_path_factory.mktemp("masked-reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, log_dir, *MASKED))
    return read_metrics(log_dir)


@pytest.fixture(scope="session")
def moe_reference(synthetic_corpus, tmp_path_factory):
    """tiny_moe, one process, fp32: the curve every expert-parallel layout must reproduce."""
    from tests.helpers.runs import read_metrics, run_pretrain, tiny_overrides

    log_dir = tmp_path_factory.mktemp("moe-reference")
    run_pretrain(1, "tiny_moe", tiny_overrides(synthetic_corpus, log_dir))
    return read_metrics(log_dir)


@pytest.fixture(scope="module")
def megatron_single_process():
    """One gloo process with megatron-core's parallel state (all sizes 1), under the CPU layer."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from parallel.layout import Layout, init_model_parallel, shutdown
    from upstream import cpu

    with cpu.applied():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            init_model_parallel(Layout(world_size=1))
            model_parallel_cuda_manual_seed(1234)
            yield
        finally:
            shutdown()


@pytest.fixture(autouse=True)
def _moe_tracker_emptied():
    """megatron-core's MoE routers log into a process-wide tracker sized by the first model's layers
    (moe_utils): emptied after each test, so an in-process MoE model of another depth can follow."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
