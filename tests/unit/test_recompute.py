"""Activation recompute: each mode reruns exactly the modules it names, and the two fixes it needs
(upstream's output-discarding checkpoint without transformer-engine, our attention's RNG fork
under sequence parallelism) each fail without the fix."""

from collections import Counter

import pytest
import torch

from model.gpt import ModelBuild, build_model_chunks, transformer_config
from pretrain.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("megatron_single_process")

BYTE_VOCAB = 257


def _forward_calls(recipe: str, overrides: list[str]) -> Counter:
    """How often each module kind ran its forward in one training forward + backward of the
    recipe's model (1 process, fp32): 2 per module instance means it was recomputed."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_cfg = load_recipe(recipe, ["model.seq_length=16", *overrides]).model
    model_parallel_cuda_manual_seed(0)
    (model,) = build_model_chunks(model_cfg, ModelBuild(), BYTE_VOCAB)
    calls: Counter = Counter()

    def count(module, args, output):
        calls[_kind(module)] += 1

    for module in model.modules():
        module.register_forward_hook(count)
    s = model_cfg.seq_length
    tokens = torch.randint(0, BYTE_VOCAB, (2, s + 1), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(s).unsqueeze(0).expand(2, s)
    try:
        model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).sum().backward()
    finally:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()  # MoE routers record their losses in a process-wide tracker
    return calls


def _kind(module) -> str:
    name = type(module).__name__
    return {"SeededTransformerLayer": "layer", "SDPAttention": "core_attn", "RMSNorm": "norm"}.get(name, name)


NONE = {"layer": 4, "core_attn": 4, "norm": 9, "MLP": 4}  # tiny_gpt: 4 layers, 2 norms each + the final norm


@pytest.mark.parametrize(
    "overrides, reruns",
    [
        ([], {}),
        (
            ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=2"],
            {"layer": 4, "core_attn": 4, "norm": 8, "MLP": 4},
        ),
        (
            ["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=1"],
            {"layer": 1, "core_attn": 1, "norm": 2, "MLP": 1},
        ),
        (["model.recompute_granularity=selective"], {"core_attn": 4}),  # megatron-core's default module
        (["model.recompute_granularity=selective", "model.recompute_modules=[layernorm]"], {"norm": 8}),
        (["model.recompute_granularity=selective", "model.recompute_modules=[mlp]"], {"MLP": 4}),
    ],
    ids=["none", "full-uniform-2", "full-block-1", "selective-default", "selective-layernorm", "selective-mlp"],
)
def test_each_mode_reruns_what_it_names(overrides, reruns):
    calls = _forward_calls("tiny_gpt", overrides)
    expected = {kind: n + reruns.get(kind, 0) for kind, n in NONE.items()}
    assert {kind: calls[kind] for kind in NONE} == expected


@pytest.mark.parametrize(
    "modules, reruns",
    [
        # megatron-core's MoELayer checkpoints its own inside (router, dispatch, experts, shared experts)
        ("[moe]", {"TopKRouter": 4, "SeededSequentialMLP": 4, "SharedExpertMLP": 4}),
        ("[shared_experts]", {"SharedExpertMLP": 4}),
        ("[layernorm,moe]", {"TopKRouter": 4, "SeededSequentialMLP": 4, "SharedExpertMLP": 4, "norm": 8}),
    ],
)
def test_moe_modules_rerun(modules, reruns):
    base = ["model.moe.shared_expert_ffn_hidden_size=32"]
    plain = _forward_calls("tiny_moe", base)
    recomputed = _forward_calls(
        "tiny_moe", [*base, "model.recompute_granularity=selective", f"model.recompute_modules={modules}"]
    )
    kinds = ["TopKRouter", "SeededSequentialMLP", "SharedExpertMLP", "norm", "core_attn"]
    assert [plain[k] for k in kinds] == [4, 4, 4, 9, 4]
    assert {k: recomputed[k] for k in kinds} == {k: plain[k] + reruns.get(k, 0) for k in kinds}


def test_transformer_config_gets_megatron_names():
    model = load_recipe(
        "tiny_gpt", ["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=3"]
    ).model
    config = transformer_config(model, ModelBuild())
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 3)
    model = load_recipe(
        "tiny_gpt", ["model.recompute_granularity=selective", "model.recompute_modules=[mlp,layernorm]"]
    ).model
    config = transformer_config(model, ModelBuild())
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["mlp", "layernorm"]
    assert transformer_config(load_recipe("tiny_gpt").model, ModelBuild()).recompute_granularity is None


# ------------------------------------------------------------------------------------------ the fixes


def test_output_discarding_checkpoint_without_transformer_engine_is_fixed():
    """tensor_parallel/random.py:636: `self.fp8 = fp8 is not None` is true for fp8=False, so the
    forward asks transformer-engine's FP8GlobalStateManager, unbound without TE."""
    from megatron.core.tensor_parallel import random as mcore_random

    from upstream import fixes

    cls = mcore_random.CheckpointWithoutOutput
    fix = fixes.FIXES.get("CheckpointWithoutOutput.__init__")
    x = torch.randn(3, requires_grad=True)
    fix.revert()
    try:
        with pytest.raises(NameError, match="FP8GlobalStateManager"):
            cls().checkpoint(torch.sin, x)
        assert "CheckpointWithoutOutput.__init__" in fixes.apply_all()
        checkpoint = cls()
        y = checkpoint.checkpoint(torch.sin, x)
        z = y * 2
        checkpoint.discard_output_and_register_recompute(z)
        z.sum().backward()
        torch.testing.assert_close(x.grad, 2 * torch.cos(x))
    finally:
        fix.apply()


def _attention_dropout_grads(attention_cls, recompute: bool) -> torch.Tensor:
    """dQ of two attention calls with dropout inside the tensor-parallel RNG fork that
    TransformerBlock opens under sequence parallelism, a draw between them (hidden dropout),
    each call checkpointed (recomputed in backward) or not."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.enums import AttnMaskType

    model = load_recipe("tiny_gpt", ["model.attention_dropout=0.5"]).model
    config = transformer_config(model, ModelBuild())
    config.sequence_parallel = True  # what the block's fork implies; TP size 1 is enough for the RNG logic
    attention = attention_cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 1, 4, 16, generator=g, requires_grad=True) for _ in range(3))
    attend = lambda q, k, v: attention(q, k, v, None)
    call = (lambda *t: tensor_parallel.checkpoint(attend, False, *t)) if recompute else attend
    model_parallel_cuda_manual_seed(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():  # transformer_block.py:706
        first = call(q, k, v)
        torch.rand(16)  # the hidden dropout between the two layers advances the stream
        second = call(q, k, v)
    (first + second).sum().backward()
    return q.grad


def test_attention_dropout_masks_are_recomputed_exactly_under_sequence_parallelism():
    from megatron.core import tensor_parallel

    from model.attention.sdpa import SDPAttention

    class ForkingAlways(SDPAttention):
        """The attention before the fix: its own fork even inside the block's."""

        def forward(self, *args, **kwargs):
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return super().forward(*args, **kwargs)

    assert torch.equal(_attention_dropout_grads(SDPAttention, False), _attention_dropout_grads(SDPAttention, True))
    # Negative control: the nested fork replays the second call with other masks.
    assert not torch.allclose(
        _attention_dropout_grads(ForkingAlways, False), _attention_dropout_grads(ForkingAlways, True)
    )
