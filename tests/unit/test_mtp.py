"""Multi-token prediction (model/mtp.py) against the DeepSeek-V3 paper's MTP module written out in
torch from the model's own weights: token i+2 predicted from the main model's output h_i and the
embedding of token i+1 (RMSNorm each, concatenate [embedding; hidden], project, one transformer
layer, the final norm, the shared output head); its loss, as megatron-core logs it, and its
gradient (mtp_loss_scaling_factor times the token-summed MTP loss, beside the LM loss) equal the
formula's. The negative controls: the wrong token's embedding, or the concatenation reversed, move
the loss far beyond the bound."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.recipes import error_of, in_tmp  # noqa: F401  (in_tmp: autouse)
from tests.unit.test_mla import _tiny_deepseek

VOCAB, SEQ, BATCH, SCALE = 128, 12, 2, 0.3
TOKENS = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))


def test_dry_run_counts_parameters_with_and_without_mtp():
    """The dry run's two counts of tiny_deepseek (one MTP module): the built model's (meta device) and
    the formula's, with MTP and without it; the MTP module's own are the difference. First in the module:
    it starts its own process group, before the module's fixtures start theirs."""
    from model.gpt import padded_vocab_size, parameter_counts
    from planning.dry_run import meta_parameter_count
    from pretrain.recipe import load_recipe

    recipe = load_recipe("tiny_deepseek", ["model.vocab_size=257", "model.mtp_num_layers=1"])
    vocab = padded_vocab_size(recipe.model, 257, 1)
    counts = parameter_counts(recipe.model, vocab)
    without = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, mtp_num_layers=0))
    assert recipe.model.mtp_num_layers == 1 and counts.mtp > 0
    assert meta_parameter_count(recipe, vocab) == counts.total
    assert (
        meta_parameter_count(without, vocab)
        == counts.total - counts.mtp
        == parameter_counts(without.model, vocab).total
    )


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _formula(chunk, hidden: torch.Tensor, tokens: torch.Tensor, shift: int = 1, reverse: bool = False):
    """Per-token MTP losses [b, s-1]: position i predicts token i+2 from h_i [s, b, h] and the
    embedding of token i+`shift` (1 in the paper)."""
    mtp, eps = chunk.mtp.layers[0], chunk.config.layernorm_epsilon
    s = tokens.shape[1] - 1  # inputs 0..s-1, labels 1..s
    inputs, labels = tokens[:, :s], tokens[:, 1:]
    nxt = torch.roll(inputs, -shift, dims=1)
    emb = _rms(F.embedding(nxt, chunk.embedding.word_embeddings.weight), mtp.enorm.weight, eps)  # [b, s, h]
    h = _rms(hidden.transpose(0, 1), mtp.hnorm.weight, eps)
    x = torch.cat([h, emb] if reverse else [emb, h], dim=-1) @ mtp.eh_proj.weight.T
    # the module's one transformer layer (its math is transformers' layer: tests/unit/test_hf_families.py),
    # causal, so the last position (no target) changes no other
    x, _ = mtp.transformer_layer(x.transpose(0, 1).contiguous(), attention_mask=None)
    logits = _rms(x, mtp.final_layernorm.weight, eps) @ chunk.output_layer.weight.T  # [s, b, v]
    losses = F.cross_entropy(logits[: s - 1].reshape(-1, VOCAB), labels[:, 1:].T.reshape(-1), reduction="none")
    return losses.view(s - 1, -1).T  # [b, s-1]


@pytest.fixture(scope="module")
def mtp_run(megatron_single_process):
    """(chunk, its per-token LM losses, the decoder output, the tracked MTP loss), one forward and
    backward of the token-summed LM loss, as our step runs it."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from model.gpt import ModelBuild, build_model_chunks
    from model.mtp import take_mtp_loss

    model = dataclasses.replace(_tiny_deepseek(), mtp_num_layers=1, mtp_loss_scaling_factor=SCALE)
    (chunk,) = build_model_chunks(model, ModelBuild(), vocab_size=VOCAB)
    captured = []
    chunk.decoder.register_forward_hook(lambda m, i, out: captured.append(out))
    MTPLossLoggingHelper.tracker.clear()
    inputs = TOKENS[:, :SEQ]
    lm = chunk(inputs, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=TOKENS[:, 1:])
    lm.sum().backward()
    logged = take_mtp_loss()  # one micro-batch, one rank: the loss itself
    return chunk, lm.detach(), captured[0].detach(), logged


def test_mtp_loss_and_gradient_equal_the_paper_formula(mtp_run):
    chunk, lm, hidden, logged = mtp_run
    mtp = chunk.mtp.layers[0]
    proj = mtp.eh_proj.weight
    ours_grad = proj.grad.clone()
    proj.grad = None
    with torch.enable_grad():
        losses = _formula(chunk, hidden, TOKENS)
        (SCALE * losses.sum()).backward(inputs=[proj])
    expected = float(losses.mean())
    assert logged == pytest.approx(expected, rel=1e-5, abs=0)
    torch.testing.assert_close(ours_grad, proj.grad, rtol=1e-5, atol=1e-7)
    # the logged LM loss is the LM loss alone: transformers-style next-token loss of the same logits
    assert lm.shape == (BATCH, SEQ) and float(lm.mean()) != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("shift, reverse", [(0, False), (2, False), (1, True)])
def test_the_formula_tells_wrong_modules_apart(mtp_run, shift, reverse):
    """Negative controls: the embedding of token i, or i+2, or [hidden; embedding]: the loss moves
    by far more than the bound."""
    chunk, _, hidden, logged = mtp_run
    with torch.no_grad():
        wrong = float(_formula(chunk, hidden, TOKENS, shift, reverse).mean())
    assert abs(wrong - logged) > 1e-3 * logged, (shift, reverse, wrong, logged)


# ------------------------------------------------------------------------------ HF conversion (model/hf.py)

MTP_HF = {  # DeepSeek-V3's layout of MTP module 0 after the tiny model's 2 layers (layer 2 is MoE)
    "model.layers.2.enorm.weight",
    "model.layers.2.hnorm.weight",
    "model.layers.2.eh_proj.weight",
    "model.layers.2.shared_head.norm.weight",
    "model.layers.2.shared_head.head.weight",
    "model.layers.2.embed_tokens.weight",
    "model.layers.2.mlp.gate.weight",
    "model.layers.2.mlp.gate.e_score_correction_bias",
}


@pytest.fixture(scope="module")
def exported(megatron_single_process, tmp_path_factory):
    """(model config, our state dict, its HF export, transformers' logits of the HF model without MTP)
    of the tiny DeepSeek-V3 family with one MTP module, random weights."""
    import json

    from model.gpt import ModelBuild, build_model_chunks, padded_vocab_size
    from model.hf import model_config_from_hf, ours_to_hf
    from tests.helpers.hf_families import VOCAB as HF_VOCAB
    from tests.helpers.hf_families import hf_model

    root = tmp_path_factory.mktemp("mtp")
    hf_model("deepseek-v3").config.save_pretrained(root)
    config = json.loads((root / "config.json").read_text())
    config |= {"architectures": ["DeepseekV3ForCausalLM"], "num_nextn_predict_layers": 1}
    model = model_config_from_hf(config)
    assert model.mtp_num_layers == 1
    (chunk,) = build_model_chunks(model, ModelBuild(), padded_vocab_size(model, HF_VOCAB, 1))
    with torch.no_grad():  # the padded rows are zero in an imported model (and dropped on export)
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            chunk.state_dict()[name][HF_VOCAB:] = 0
    state = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    return model, state, ours_to_hf(state, model, HF_VOCAB), config


def test_mtp_export_has_deepseek_v3_layout_and_imports_back_bitwise(exported):
    from model.gpt import padded_vocab_size
    from model.hf import hf_config_from_model, hf_to_ours
    from tests.helpers.hf_families import VOCAB as HF_VOCAB

    model, state, hf, config = exported
    layer2 = {n for n in hf if n.startswith("model.layers.2.")}
    assert MTP_HF <= layer2 and {n.replace(".2.", ".1.", 1) for n in layer2 - MTP_HF} <= set(hf)
    torch.testing.assert_close(
        hf["model.layers.2.embed_tokens.weight"], hf["model.embed_tokens.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(hf["model.layers.2.shared_head.head.weight"], hf["lm_head.weight"], rtol=0, atol=0)
    back = hf_to_ours(hf, model, padded_vocab_size(model, HF_VOCAB, 1))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert hf_config_from_model(model, HF_VOCAB)["num_nextn_predict_layers"] == 1


def test_mtp_tensors_without_num_nextn_predict_layers_are_refused(exported):
    """A checkpoint with an MTP module whose config.json says num_nextn_predict_layers 0 (or a
    model config without MTP): refused in one line naming the tensors, never imported without them.
    One that names an MTP module and holds none of its tensors (transformers' save) imports without
    MTP (tools/convert_hf.py says so in one line); an MTP copy of the embedding that differs: refused."""
    from common.errors import UserError
    from model.hf import hf_to_ours, without_absent_mtp

    model, _, hf, _ = exported
    with pytest.raises(UserError) as info:
        hf_to_ours(hf, dataclasses.replace(model, mtp_num_layers=0), 1024)
    assert str(info.value).startswith(
        "Hugging Face checkpoint has 44 tensor(s) no DeepSeek-V3 rule maps: model.layers.2."
    )
    assert str(info.value).endswith("(a multi-token prediction module? config.json's num_nextn_predict_layers is 0)")
    # transformers saves num_nextn_predict_layers (its default 1) and no MTP tensors: imported without MTP
    main_only = {k: v for k, v in hf.items() if not k.startswith("model.layers.2.")}
    assert without_absent_mtp(main_only, model) == dataclasses.replace(model, mtp_num_layers=0)
    assert without_absent_mtp(hf, model) is model
    changed = {**hf, "model.layers.2.embed_tokens.weight": hf["model.embed_tokens.weight"] + 1}
    with pytest.raises(UserError) as info:
        hf_to_ours(changed, model, 1024)
    assert str(info.value) == (
        "Hugging Face checkpoint: model.layers.2.embed_tokens.weight differs from the tensor it copies"
    )


# ------------------------------------------------------------------------------ forward without labels


def _without_mtp(chunk, model):
    """The same model (weights copied) built without MTP."""
    from model.gpt import ModelBuild, build_model_chunks

    (plain,) = build_model_chunks(
        dataclasses.replace(model, mtp_num_layers=0), ModelBuild(perform_initialization=False), chunk.vocab_size
    )
    state = {k: v for k, v in chunk.state_dict().items() if not k.startswith("mtp.")}
    plain.load_state_dict(state)
    return plain.eval()


def test_upstream_forward_without_labels_is_fixed(mtp_run):
    """gpt_model.py:611-612 takes labels.clone() for the MTP loss in every forward: logits and
    generation (no labels) fail with AttributeError. Fixed, the logits are the MTP-free model's."""
    from tests.helpers.fixes import unfixed

    chunk = mtp_run[0].eval()
    inputs, positions = TOKENS[:, :SEQ], torch.arange(SEQ).expand(BATCH, SEQ)
    with unfixed("GPTModel._postprocess"), pytest.raises(AttributeError, match="clone"), torch.no_grad():
        chunk(inputs, positions, None)
    with torch.no_grad():
        logits = chunk(inputs, positions, None)
        expected = _without_mtp(chunk, _tiny_deepseek())(inputs, positions, None)
    chunk.train()
    assert torch.equal(logits, expected)


def test_greedy_generation_with_mtp_equals_transformers_generate(megatron_single_process, tmp_path):
    """An imported tiny DeepSeek-V3 (MLA, group-limited routing) given an MTP module: model/generation.py's
    greedy decoding (megatron-core's KV cache) gives transformers' generate, token for token (the
    MTP module takes no part in generation; tools/generate.py runs this same function)."""
    import json

    from data.tokenizer import build_tokenizer
    from model.generation import Sampling, generate
    from model.gpt import ModelBuild, build_model_chunks, padded_vocab_size
    from model.hf import hf_to_ours, load_exactly, model_config_from_hf
    from tests.helpers.hf_families import hf_model, read_tensors

    hf = hf_model("deepseek-v3", vocab_size=257, initializer_range=0.2)  # peaked: the greedy path wanders
    hf.save_pretrained(tmp_path)
    config = {**json.loads((tmp_path / "config.json").read_text()), "architectures": ["DeepseekV3ForCausalLM"]}
    model = dataclasses.replace(model_config_from_hf(config), mtp_num_layers=1)
    padded = padded_vocab_size(model, 257, 1)
    (chunk,) = build_model_chunks(model, ModelBuild(), padded)
    state = hf_to_ours(read_tensors(tmp_path), dataclasses.replace(model, mtp_num_layers=0), padded)
    state |= {k: v for k, v in chunk.state_dict().items() if k.startswith("mtp.") and not k.endswith("_extra_state")}
    load_exactly(chunk, state, "test")
    prompt = list(b"The quick brown fox")
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=256, pad_token_id=256
        )
    expected = out[0, len(prompt) :].tolist()
    assert len(set(expected)) > 6, expected  # a wandering path: a wrong cache or position would show
    got = generate(chunk.eval(), build_tokenizer("byte"), prompt, 16, Sampling(temperature=0), 257)
    assert got == expected
