"""model/grouped_experts.py in one process: grouped-GEMM experts against megatron-core's
SequentialMLP with the same weights (outputs and every gradient, bit for bit), their GEMMs really
grouped, moe_act recompute, the sharded state dict, parameter counts and the recipe's refusals."""

import dataclasses
import re

import pytest
import torch

from common.errors import RecipeError
from model.gpt import ModelBuild, build_model_chunks, meta_device, padded_vocab_size, parameter_counts
from pretrain.recipe import load_recipe

TOKENS_PER_EXPERT = [5, 0, 3, 7, 1, 4, 0, 6]  # tiny_moe's 8 experts, two of them without tokens


def _model(**moe_fields):
    model = load_recipe("tiny_moe").model
    return dataclasses.replace(model, moe=dataclasses.replace(model.moe, **moe_fields))


def _experts(grouped: bool, **model_fields):
    """Layer 1's experts of tiny_moe, built as the trainer builds them (same seed both ways)."""
    model = dataclasses.replace(_model(grouped_gemm=grouped), **model_fields)
    torch.manual_seed(0)
    (chunk,) = build_model_chunks(model, ModelBuild(), 256)
    return chunk.decoder.layers[0].mlp.experts


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    counts = torch.tensor(TOKENS_PER_EXPERT)
    tokens = int(counts.sum())
    hidden = torch.randn(tokens, 64, generator=g).to(dtype)
    probs = torch.rand(tokens, generator=g)
    grad = torch.randn(tokens, 64, generator=g).to(dtype)
    return hidden, counts, probs, grad


def _run(experts, counts, hidden, probs, grad) -> dict:
    """Output, input and probability gradients, and each expert's fc1/fc2 weight gradients."""
    hidden, probs = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = experts(hidden, counts, probs)
    assert bias is None
    out.backward(grad)
    if hasattr(experts, "weight1"):
        fc1, fc2 = list(experts.weight1.grad), list(experts.weight2.grad)
    else:
        fc1 = [e.linear_fc1.weight.grad for e in experts.local_experts]
        fc2 = [e.linear_fc2.weight.grad for e in experts.local_experts]
    return dict(out=out.detach(), hidden=hidden.grad, probs=probs.grad, fc1=fc1, fc2=fc2)


def _assert_equal(a: dict, b: dict) -> None:
    for key in a:
        pairs = zip(a[key], b[key]) if isinstance(a[key], list) else [(a[key], b[key])]
        for x, y in pairs:
            assert torch.equal(x, y), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_equal_sequential_bit_for_bit(dtype, megatron_single_process):
    sequential, grouped = _experts(False), _experts(True)
    for e, expert in enumerate(sequential.local_experts):  # the same initialization, stacked
        assert torch.equal(grouped.weight1[e], expert.linear_fc1.weight)
        assert torch.equal(grouped.weight2[e], expert.linear_fc2.weight)
    sequential.to(dtype), grouped.to(dtype)
    hidden, counts, probs, grad = _inputs(dtype)
    want = _run(sequential, counts, hidden, probs, grad)
    _assert_equal(_run(grouped, counts, hidden, probs, grad), want)
    # The control: one token handed to the neighbouring expert changes the result.
    shifted = counts.clone()
    shifted[0], shifted[2] = shifted[0] - 1, shifted[2] + 1
    grouped.zero_grad()
    assert not torch.equal(_run(grouped, shifted, hidden, probs, grad)["out"], want["out"])


def test_no_token_on_this_rank_still_gives_zero_gradients(megatron_single_process):
    """A rank whose experts got no token must still produce their gradients (DDP's buckets wait
    for them); torch's own backward of _grouped_mm raises on zero rows."""
    grouped = _experts(True)
    hidden = torch.zeros(0, 64, requires_grad=True)
    out, _ = grouped(hidden, torch.zeros(8, dtype=torch.long), torch.zeros(0))
    out.sum().backward()
    assert out.shape == (0, 64) and torch.count_nonzero(grouped.weight1.grad) == 0
    with pytest.raises(RuntimeError):
        w = grouped.weight1.detach().requires_grad_()
        torch._grouped_mm(hidden.detach(), w.transpose(-2, -1), offs=torch.zeros(8, dtype=torch.int32)).sum().backward()


def test_forward_and_both_backward_gemms_are_grouped(megatron_single_process):
    grouped = _experts(True)
    hidden, counts, probs, grad = _inputs()
    with torch.profiler.profile() as prof:
        _run(grouped, counts, hidden, probs, grad)
    calls = [e.name for e in prof.events() if e.name == "aten::_grouped_mm"]
    assert len(calls) == 6  # fc1, fc2 forward; dx and dW of each in the backward pass


def _saved_bytes(experts, hidden, counts, probs) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = experts(hidden.clone().requires_grad_(), counts, probs.clone().requires_grad_())
    # a discarded output is resized to nothing after the forward (CheckpointWithoutOutput)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in saved}  # views share one
    return sum(s.nbytes() for s in storages.values())


def test_moe_act_recompute_frees_the_activation_and_keeps_the_numbers(megatron_single_process):
    plain = _experts(True)
    recompute = _experts(True, recompute_granularity="selective", recompute_modules=["moe_act"])
    assert recompute.activation_recompute and not plain.activation_recompute
    hidden, counts, probs, grad = _inputs()
    tokens, ffn = hidden.shape[0], 64
    freed = _saved_bytes(plain, hidden, counts, probs) - _saved_bytes(recompute, hidden, counts, probs)
    # what the activation keeps (silu's output, the up projection + glu offset, their product) and
    # its output (fc2's input): four [tokens, ffn] fp32 tensors; fc1's output stays, as upstream's
    assert freed == 4 * tokens * ffn * 4
    _assert_equal(_run(recompute, counts, hidden, probs, grad), _run(plain, counts, hidden, probs, grad))


def _sharded_entries(chunk) -> list:
    """Every expert tensor and object of the chunk's sharded state dict, factories applied."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = {k: v for k, v in chunk.sharded_state_dict().items() if ".mlp.expert" in k}
    apply_factories(sd)
    flat: list = []

    def walk(x):
        if isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, list):
            [walk(v) for v in x]
        else:
            flat.append(x)

    walk(sd)
    return sorted(
        (x.key, x.global_shape, x.global_offset, x.replica_id)
        + ((x.local_shape, x.data.contiguous().view(-1).tolist()) if isinstance(x, ShardedTensor) else ())
        for x in flat
    )


def test_sharded_state_dict_is_sequential_mlps(megatron_single_process):
    """Same keys, shapes, offsets, replica ids and values: a checkpoint of either loads into the other."""
    chunks = {}
    for grouped in (False, True):
        torch.manual_seed(0)
        (chunks[grouped],) = build_model_chunks(_model(grouped_gemm=grouped), ModelBuild(), 256)
    sequential, grouped_entries = _sharded_entries(chunks[False]), _sharded_entries(chunks[True])
    assert len(sequential) == 4 * 8 * 2 * 2 + 4 * 8  # fc1 (gate, up), fc2, 2 extra states; per expert, layer
    assert grouped_entries == sequential
    with torch.no_grad():  # the control: another expert order shows
        chunks[True].decoder.layers[0].mlp.experts.weight2[:2] = (
            chunks[True].decoder.layers[0].mlp.experts.weight2[[1, 0]]
        )
    assert _sharded_entries(chunks[True]) != sequential


def test_formula_equals_built_model_with_grouped_experts(megatron_single_process):
    model = _model(grouped_gemm=True)
    vocab = padded_vocab_size(model, 257, tensor=1)
    with meta_device():
        (chunk,) = build_model_chunks(model, ModelBuild(perform_initialization=False), vocab)
    assert parameter_counts(model, vocab).total == sum(p.numel() for p in chunk.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.moe.grouped_gemm=true", "model.add_bias_linear=true"],
            "model.moe.grouped_gemm = true cannot be combined with model.add_bias_linear = true "
            "(grouped experts have no linear biases, as megatron-core's GroupedMLP)",
        ),
        (
            ["model.moe.grouped_gemm=true", "parallel.fsdp=zero2"],
            "model.moe.grouped_gemm = true with parallel.fsdp = zero2 is not verified: FSDP2 would shard the "
            "stacked expert weights by expert; set model.moe.grouped_gemm = false",
        ),
        (
            ["model.moe.grouped_gemm=true", "fp8.enabled=true", "train.precision=bf16"],
            "fp8 on the local spec has no grouped-GEMM experts (torch._scaled_grouped_mm has no CPU kernel to "
            "verify them against): set model.moe.grouped_gemm = false, or transformer_impl = transformer_engine",
        ),
    ],
)
def test_grouped_recipe_errors(overrides, message):
    with pytest.raises(RecipeError, match="^" + re.escape(message) + "$"):
        load_recipe("tiny_moe", overrides)


def test_moe_act_is_accepted_with_grouped_experts():
    overrides = ["model.recompute_granularity=selective", "model.recompute_modules=[moe_act]"]
    load_recipe("tiny_moe", ["model.moe.grouped_gemm=true", *overrides])
    with pytest.raises(RecipeError, match="moe_act has nothing to recompute"):
        load_recipe("tiny_moe", overrides)


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.recompute_granularity=selective", "model.recompute_modules=[moe_act]"]],
    ids=["grouped", "grouped-moe-act"],
)
def test_memory_model_keeps_what_a_grouped_forward_keeps(overrides, megatron_single_process):
    """planning/activations.py against the storages a whole tiny_moe forward keeps (as
    tests/unit/test_memory.py does for sequential experts); moe_act takes the activation out."""
    from planning.memory import chunk_bytes, setup_for
    from tests.unit.test_memory import CPU, SCALARS, _saved_bytes

    base = ["model.seq_length=64", "model.moe.capacity_factor=1.0", "model.moe.pad_to_capacity=true"]
    recipe = load_recipe("tiny_moe", [*base, "model.moe.grouped_gemm=true", *overrides])
    predicted = chunk_bytes(setup_for(recipe, 1, CPU), (0, recipe.model.num_layers), first=True, last=True).kept
    assert abs(predicted - _saved_bytes(recipe, micro_batch=2)) <= 2 * SCALARS * (recipe.model.num_layers + 1)


@pytest.mark.parametrize("saved, current", [(True, False), (False, True)])
def test_dp_reshardable_buffers_refuse_the_other_expert_kind(saved, current, tmp_path):
    """Flat optimizer buffers order grouped and sequential expert parameters otherwise with the same
    sizes: loading one into the other would scramble the state silently (pretrain/checkpoint/storage.py
    calls this before loading a dp_reshardable save)."""
    from types import SimpleNamespace

    from common.errors import UserError
    from pretrain.checkpoint.storage import _refuse_other_expert_buffers

    extra = {"recipe": {"model": {"moe": {"grouped_gemm": saved}}}}
    chunk = SimpleNamespace(module=SimpleNamespace(config=SimpleNamespace(num_moe_experts=8, moe_grouped_gemm=current)))
    kinds = {True: "grouped", False: "sequential"}
    message = (
        f"checkpoint '{tmp_path}' holds dp_reshardable optimizer buffers of {kinds[saved]} experts; this run has "
        f"model.moe.grouped_gemm = {str(current).lower()}: resume with the saved setting, or from a fully_reshardable save"
    )
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        _refuse_other_expert_buffers(extra, [chunk], tmp_path)
    same = SimpleNamespace(module=SimpleNamespace(config=SimpleNamespace(num_moe_experts=8, moe_grouped_gemm=saved)))
    _refuse_other_expert_buffers(extra, [same], tmp_path)  # the same setting loads
