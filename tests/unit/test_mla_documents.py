"""Multi-latent attention on packed samples of documents (model/attention/mla.py:positioned_mla,
model/attention/documents.py) against transformers' DeepseekV3ForCausalLM, plain RoPE and YaRN:

- data.reset_position_ids alone: our logits with positions restarting at each document equal
  transformers' given the same position_ids (the whole sample attended causally);
- with data.reset_attention_mask too: the packed sample's logits equal transformers' on each document
  run alone, concatenated (MLA's values narrower than its queries through the document kernels).

Negative controls: the sample's positions instead of the restarted ones (what MLA applied before),
and the packed sample without the document mask, each move the logits far beyond the bound. With the
mask, the positions make no difference (RoPE is relative inside each document): the first check
is the one that sees them."""

import json

import pytest
import torch

from tests.helpers.hf_families import VOCAB, hf_model, read_tensors

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

LOGITS_ATOL = 1e-5  # tests/unit/test_hf_families.py's bound (fp32 both sides)
LENGTHS = [7, 12, 5, 16]  # documents of the packed sample
SEQ = sum(LENGTHS)
TOKENS = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
IDS = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(LENGTHS)]).view(1, SEQ)
POSITIONS = torch.cat([torch.arange(n) for n in LENGTHS]).view(1, SEQ)


@pytest.fixture(scope="module", params=["deepseek-v3", "deepseek-v3-yarn"])
def pair(request, megatron_single_process, tmp_path_factory):
    """(transformers' model, ours imported from it and built for per-token positions)."""
    from model.gpt import ModelBuild, build_model_chunks, padded_vocab_size
    from model.hf import hf_to_ours, load_exactly, model_config_from_hf

    root = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param).eval()
    hf.save_pretrained(root)
    model = model_config_from_hf(json.loads((root / "config.json").read_text()))
    vocab = padded_vocab_size(model, VOCAB, tensor=1)
    (chunk,) = build_model_chunks(model, ModelBuild(perform_initialization=False, document_positions=True), vocab)
    load_exactly(chunk, hf_to_ours(read_tensors(root), model, vocab), "test")
    return hf, chunk.eval()


def _ours(chunk, positions, ids=None):
    with torch.no_grad():
        return chunk(TOKENS, positions, ids)[..., :VOCAB]


def test_restarted_positions_equal_transformers_position_ids(pair):
    hf, chunk = pair
    with torch.no_grad():
        expected = hf(TOKENS, position_ids=POSITIONS).logits
    torch.testing.assert_close(_ours(chunk, POSITIONS), expected, rtol=0, atol=LOGITS_ATOL)
    moved = float((_ours(chunk, torch.arange(SEQ).view(1, SEQ)) - expected).abs().max())
    assert moved > 1e-3, moved  # negative control: the sample's positions


def test_documents_equal_transformers_on_each_document_alone(pair):
    hf, chunk = pair
    with torch.no_grad():
        expected = torch.cat([hf(part).logits for part in TOKENS.split(LENGTHS, dim=1)], dim=1)
    torch.testing.assert_close(_ours(chunk, POSITIONS, IDS), expected, rtol=0, atol=LOGITS_ATOL)
    moved = float((_ours(chunk, POSITIONS) - expected).abs().max())
    assert moved > 1e-3, moved  # negative control: no document mask
