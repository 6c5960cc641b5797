"""tools/convert_hf.py against transformers' own Llama and Mixtral, built locally from small
configs with random weights (no hub): logits parity, exact round trips, and other layouts in/out."""

import json
import pathlib
import subprocess

import pytest
import torch

from tests.helpers.hf_families import llama_config, mixtral_config
from tests.helpers.runs import read_metrics, run_pretrain, tiny_overrides
from tests.helpers.warm import run_python

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

VOCAB = 1000  # not a multiple of 128: the import pads the vocabulary, the export trims it
TOKEN_IDS = (7, 9)  # bos, eos: export must keep them
LOGITS_ATOL = 1e-4  # the bound; measured 2.4e-7 for both models (fp32, 2026-11-23)


HF_MODELS = {
    "llama": (lambda: llama_config(VOCAB), "LlamaForCausalLM"),
    "mixtral": (lambda: mixtral_config(VOCAB), "MixtralForCausalLM"),
}
# Every family (Qwen3 and Qwen3-MoE too) in one process: tests/unit/test_hf_families.py; import_hf
# and export_hf at other layouts: tests/distributed/test_hf_layouts.py.


def _convert(*args: str) -> subprocess.CompletedProcess:
    return run_python(["-m", "tools.convert_hf", *args], timeout=300)


@pytest.fixture(scope="module", params=list(HF_MODELS))
def hf_model(request, tmp_path_factory):
    """(name, HF dir saved with save_pretrained, imported checkpoint dir)."""
    make_config, cls = HF_MODELS[request.param]
    torch.manual_seed(0)
    config = make_config()
    config.bos_token_id, config.eos_token_id = TOKEN_IDS  # not the families' defaults (1 and 2)
    model = getattr(transformers, cls)(config)
    for p in model.parameters():  # norms start at 1 in HF; random makes the test see them
        if p.dim() == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "hf")
    proc = _convert("import", str(root / "hf"), str(root / "ckpt"))
    assert proc.returncode == 0, proc.stderr
    return request.param, root / "hf", root / "ckpt"


def _tensors(directory: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.slow
def test_import_then_export_reproduces_the_tensors_exactly(hf_model, tmp_path):
    name, hf_dir, ckpt = hf_model
    proc = _convert("export", str(ckpt), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    original, exported = _tensors(hf_dir), _tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor.float()), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [HF_MODELS[name][1]]
    reloaded = getattr(transformers, HF_MODELS[name][1]).from_pretrained(tmp_path / "out")
    assert reloaded.config.vocab_size == VOCAB
    # the special-token ids survive the round trip, where generate reads them
    assert (config["bos_token_id"], config["eos_token_id"]) == TOKEN_IDS
    generation = reloaded.generation_config
    assert (generation.bos_token_id, generation.eos_token_id) == TOKEN_IDS


def _our_logits(ckpt: pathlib.Path, tokens: torch.Tensor) -> torch.Tensor:
    import yaml

    from model.gpt import ModelBuild, build_model_chunks, padded_vocab_size
    from pretrain.checkpoint import storage
    from pretrain.recipe import model_config_from_dict

    model_cfg = model_config_from_dict(yaml.safe_load((ckpt / "model.yaml").read_text())["model"], "model.yaml")
    vocab = padded_vocab_size(model_cfg, model_cfg.vocab_size, tensor=1)
    (model,) = build_model_chunks(model_cfg, ModelBuild(perform_initialization=False), vocab)
    storage.load(storage.resolve_load(str(ckpt), ckpt), [model], None)
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., :VOCAB]


def test_logits_match_transformers(hf_model, megatron_single_process):
    name, hf_dir, ckpt = hf_model
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    reference = getattr(transformers, HF_MODELS[name][1]).from_pretrained(hf_dir).eval()
    with torch.no_grad():
        expected = reference(tokens).logits
    ours = _our_logits(ckpt, tokens)
    assert ours.shape == expected.shape
    assert float((ours - expected).abs().max()) <= LOGITS_ATOL
    assert float(expected.std()) > 0.1  # not a degenerate model


@pytest.mark.slow
def test_any_layout_in_and_out(synthetic_corpus, tmp_path):
    """Imported Llama weights trained one step at TP2×PP2 and at TP1 give the same loss (in); the
    TP2×PP2 checkpoint exports to the same tensors as the TP1 one (out)."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config(VOCAB)).save_pretrained(tmp_path / "hf")
    assert _convert("import", str(tmp_path / "hf"), str(tmp_path / "ckpt")).returncode == 0
    runs = {"tp1": (1, []), "tp2-pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"])}
    for name, (nproc, extra) in runs.items():
        proc = run_pretrain(
            nproc,
            "tiny_gpt",
            tiny_overrides(
                synthetic_corpus,
                tmp_path / name,
                f"model.vocab_size={VOCAB}",
                "train.steps=1",
                f"checkpoint.load={tmp_path / 'ckpt'}",
                *extra,
            ),
        )
        assert "loaded weights from" in proc.stdout
        out = _convert("export", str(tmp_path / name / "checkpoints"), str(tmp_path / f"{name}-hf"))
        assert out.returncode == 0, out.stderr
    (one,), (four,) = read_metrics(tmp_path / "tp1"), read_metrics(tmp_path / "tp2-pp2")
    assert abs(one["loss"] - four["loss"]) <= 1e-5 * one["loss"]
    assert one["loss"] == pytest.approx(6.9, abs=0.1)  # ≈ ln(1000): the imported random model
    a, b = _tensors(tmp_path / "tp1-hf"), _tensors(tmp_path / "tp2-pp2-hf")
    assert sorted(a) == sorted(b)
    # One Adam step from each layout: the gradients agree to ~1e-7 relative, but Adam's first update
    # is about lr·sign(g), so a near-zero gradient component can move its weight a few 1e-6
    # differently (measured max 2.1e-6 of weights ~0.02); a wrong mapping would differ by ~1e-2.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_bad_hf_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    proc = _convert("import", str(tmp_path), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'config.json'}: architectures ['GPT2LMHeadModel'] not supported; "
        "expected one of ['DeepseekV3ForCausalLM', 'LlamaForCausalLM', 'MixtralForCausalLM', 'Qwen3ForCausalLM', 'Qwen3MoeForCausalLM']"
    ]


def test_export_of_a_recipe_without_vocab_size(reference, tmp_path):
    """tiny_gpt says `vocab_size: null` (the tokenizer's): the checkpoint records the real size (the
    quickstart's checkpoint failed to export with a TypeError)."""
    log_dir, _ = reference
    proc = _convert("export", str(log_dir / "checkpoints"), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 257  # the byte tokenizer's ids, unpadded
    # generate stops at the end of a document: the byte tokenizer's EOD; it has no BOS
    assert (config["bos_token_id"], config["eos_token_id"]) == (None, 256)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": None, "eos_token_id": 256}
