"""model/generation.py (megatron-core's static KV-cache path with our sampler) against transformers'
`generate`, in one process, for the family furthest from tests/e2e/test_generate.py's plain Llama
(as a user runs tools/generate.py): DeepSeek-V3's multi-latent attention (megatron-core's MLA
inference path, its own KV cache) with YaRN, and its experts with grouped routing. Greedy, 16 new
ids from a 6-id prompt: the same ids. (Llama-3.1's scaled RoPE, Qwen3, Qwen3-MoE and DeepSeek-V3
without YaRN decode alike too, checked by hand 2026-12-07 with this test; left out for the time.)

Negative control (by hand, 2026-12-07): with the decode step's attention over the cache replaced by
causal attention over the new query alone (model/attention/sdpa.py, the no_mask step as causal),
the ids differ from the second new id on (run for Llama-3.1, Qwen3-MoE and this DeepSeek-V3)."""

import json

import pytest
import torch

from tests.helpers.hf_families import hf_model, read_tensors
from tests.unit.test_hf_families import _imported

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

PROMPT = [5, 17, 300, 42, 7, 99]
NEW = 16
EOD = 999  # an id of the vocabulary that greedy decoding of these models does not reach


class _Ids:
    """The tokenizer generate() asks for: only its end-of-document id is read."""

    eod = EOD

    def tokenize(self, text: str) -> list[int]:
        return []

    def detokenize(self, ids: list[int]) -> str:
        return ""


@pytest.mark.parametrize("name", ["deepseek-v3-yarn"])
def test_greedy_ids_equal_transformers_generate(name, megatron_single_process, tmp_path):
    from model.generation import Sampling, generate

    model = hf_model(name, initializer_range=0.2)  # peaked logits: the greedy path wanders
    model.save_pretrained(tmp_path)
    _, chunk = _imported(json.loads((tmp_path / "config.json").read_text()), read_tensors(tmp_path))
    ours = generate(chunk, _Ids(), PROMPT, NEW, Sampling(temperature=0), decodable=1000)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, eos_token_id=EOD, pad_token_id=EOD
        )
    theirs = out[0, len(PROMPT) :].tolist()
    assert len(theirs) == NEW and len(set(theirs)) > NEW // 2, theirs  # a wrong cache or position would show
    assert ours == theirs
