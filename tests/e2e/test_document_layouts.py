"""Attention inside documents trains the same model in every layout: with data.reset_attention_mask
and data.reset_position_ids on a corpus of short documents (about six to a sample), each layout's
curve and validation losses equal the one-process run's (tests/e2e/test_layouts.py's bound).

That one-process run is the outside reference's (tests/e2e/test_outside_reference.py: transformers
on each document alone), whose negative control shows the packed curve is far from it, so a layout
that lost the documents (a rank attending across them, positions not restarted) fails here."""

import pytest

from tests.e2e.test_layouts import FP32_REL
from tests.helpers.runs import (
    MASKED,
    assert_close_curves,
    assert_close_validation,
    read_metrics,
    run_pretrain,
    tiny_overrides,
)

DOCUMENTS = ("data.reset_attention_mask=true", "data.reset_position_ids=true")

# The seven layouts in five runs of at most 4 processes: TP2+SP with PP2, CP2 ring with
# DP2, CP4 ring, CP2 a2a, CP4 a2a 2 × p2p 2.
LAYOUTS = {
    "tp2-sp-pp2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"]),
    "cp2-ring-dp2": (4, ["parallel.context=2"]),
    "cp4-ring": (4, ["parallel.context=4"]),
    "cp2-a2a": (2, ["parallel.context=2", "parallel.context_comm=a2a"]),
    "cp4-a2a2-p2p2": (4, ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2"]),
}


@pytest.fixture(scope="module")
def document_reference(short_document_corpus, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("document-reference")
    run_pretrain(1, "tiny_gpt", tiny_overrides(short_document_corpus, log_dir, *MASKED, *DOCUMENTS))
    return read_metrics(log_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_documents_in_every_layout_reproduce_single_process(name, document_reference, short_document_corpus, tmp_path):
    nproc, extra = LAYOUTS[name]
    run_pretrain(nproc, "tiny_gpt", tiny_overrides(short_document_corpus, tmp_path, *MASKED, *DOCUMENTS, *extra))
    metrics = read_metrics(tmp_path)
    assert_close_curves(metrics, document_reference, rel=FP32_REL)
    assert_close_validation(metrics, document_reference, rel=FP32_REL)
    # the pairs inside documents, counted once over data and context ranks: the same in every layout
    assert_close_curves(metrics, document_reference, rel=1e-12, keys=("attended_fraction",))
    assert 0 < metrics[0]["attended_fraction"] < 0.5
