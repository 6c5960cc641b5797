"""The transformer-engine path of the memory model (planning/activations.py, memory.py), hand-counted
from what TE 2.x's modules save for their backward: LayerNormLinear's input, FP8 norm output and
rsigma; Linear's FP8 input; a contiguous copy of v; the fused SwiGLU's fc1 output; FP8 weight
workspaces, or FP8 primary weights (fp8.params). TE does not run on the CPU: these are hand counts.
Negative control (by hand): with Kernels.fp8 ignored, or the TE branches of norm_and_linear_input and
attention_bytes removed, every difference asserted here is 0 and the tests fail."""

from model.gpt import layer_parameters
from planning.activations import Kernels, Shape, dense_layer
from planning.memory import estimate_setup, setup_for
from planning.te_memory import fp8_weight_bytes
from pretrain.recipe import load_recipe

LLAMA_VOCAB = 128256
SHAPE = Shape(micro_batch=1, seq=8192, tensor=4, sequence_parallel=True, dtype_bytes=2)


def _layers(fp8: bool):
    model = load_recipe("llama70b").model
    te = dense_layer(model, SHAPE, Kernels("cuda", True, fp8))
    return model, te, dense_layer(model, SHAPE, Kernels("cuda", False))


def test_te_layer_keeps_what_its_modules_save():
    model, te, local = _layers(fp8=False)
    n, n_sp, h, t = 8192, 2048, model.hidden_size, 4
    kv = 8 * 128
    # LayerNormLinear: its input, the normalized output and rsigma; the local norm + linear keep the same
    assert te["input_norm"] == local["input_norm"] == n_sp * (2 * h * 2 + 4)
    # get_qkv_layout's contiguous v: [s, groups, head_dim], not the whole QKV output
    assert local["core_attn"] - te["core_attn"] == n * (h + kv) // t * 2
    # fused SwiGLU: fc1's output and fc2's input, 3 ffn-wide tensors, where the local path keeps 5
    assert te["mlp"] == n * model.ffn_hidden_size // t * 2 * 3
    assert local["mlp"] == n * model.ffn_hidden_size // t * 2 * 5


def test_te_fp8_keeps_one_byte_input_copies():
    model, fp8, _ = _layers(fp8=True)
    _, bf16, _ = _layers(fp8=False)
    n, n_sp, h, t, ffn = 8192, 2048, model.hidden_size, 4, model.ffn_hidden_size
    assert bf16["input_norm"] - fp8["input_norm"] == n_sp * h  # ln_out: 1 byte, not 2
    assert fp8["attn_out"] - bf16["attn_out"] == n * h // t  # the projection's FP8 input beside the kept output
    assert bf16["mlp"] - fp8["mlp"] == n * ffn // t  # fc2's FP8 input; the bf16 product is freed


def test_fp8_weight_workspaces_and_fp8_params():
    """Without fp8.params each FP8 layer's linears cache their weight row- and column-wise (2 bytes per
    weight) beside the bf16 weight; with fp8.params those FP8 tensors are the weights: no more than bf16."""
    base = ["model.vocab_size=128256", "parallel.context=1", "fp8.enabled=true", "fp8.first_last_layers_bf16=1"]

    def setup(*extra):
        return setup_for(load_recipe("llama70b", [*base, *extra]), 512, None, LLAMA_VOCAB)

    cached, params, off = setup(), setup("fp8.params=true"), setup("fp8.enabled=false")
    m = cached.model
    linear = layer_parameters(m, False, tensor=8) - 2 * m.hidden_size
    # stage 0 holds layers 0-3, 16-19, ...: 20 layers, layer 0 stays bf16
    assert fp8_weight_bytes(cached, 0) == 19 * linear * 2
    assert fp8_weight_bytes(params, 0) == 0 and fp8_weight_bytes(off, 0) == 0
    worst = {s.pipeline_rank: s.weights for s in estimate_setup(cached).stages}
    assert worst[1] - {s.pipeline_rank: s.weights for s in estimate_setup(off).stages}[1] == 20 * linear * 2
