"""tools.convert_hf export of a model with DeepSeek-V3's multi-token prediction module: its HF
layer `num_hidden_layers` holds copies of the embedding and the output layer, the same tensors as
`model.embed_tokens` and `lm_head`, which safetensors refuses to save shared (before: a
RuntimeError traceback, so no trained MTP model could be exported). Export, import and export again
is bitwise, and the copies equal the originals. Negative control (by hand, 2026-12-07): without
convert_hf's `_unshared` the first export raises safetensors' "Some tensors share memory"."""

import dataclasses

import torch


def test_an_mtp_model_exports_and_round_trips(megatron_single_process, tmp_path):
    from safetensors.torch import load_file

    from pretrain.checkpoint import storage
    from pretrain.recipe import Recipe, load_recipe, recipe_to_dict
    from tools.convert_hf import _build, export_hf, import_hf

    model_cfg = dataclasses.replace(load_recipe("tiny_deepseek", []).model, mtp_num_layers=1, vocab_size=257)
    torch.manual_seed(0)
    model, _ = _build(model_cfg, 257)
    for p in model.parameters():  # the import's build leaves the weights uninitialized
        torch.nn.init.uniform_(p, -0.1, 0.1)
    extra = {"step": 0, "recipe": recipe_to_dict(Recipe(model=model_cfg)), "vocab_size": 257}
    storage.save(tmp_path / "ckpt", 0, [model], None, extra)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt2")
    export_hf(tmp_path / "ckpt2", tmp_path / "hf2")
    first, second = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(first["model.layers.4.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(first["model.layers.4.shared_head.head.weight"], first["lm_head.weight"])
    assert first["model.layers.4.eh_proj.weight"].shape == (64, 128)
