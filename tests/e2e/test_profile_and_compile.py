"""train.profile writes a Perfetto-readable trace of the chosen steps on the chosen ranks;
train.compile runs torch.compile on the chosen parts of every layer and trains the same curve."""

import json

import pytest

from common.errors import RecipeError
from planning.setup import validate_for_world
from pretrain.recipe import load_recipe
from tests.helpers.runs import assert_close_curves, read_metrics, run_pretrain, tiny_overrides


def test_profile_traces_the_chosen_steps_with_memory(synthetic_corpus, tmp_path):
    proc = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus,
            tmp_path,
            "train.steps=4",
            "train.profile.start_step=2",
            "train.profile.end_step=3",
            "train.profile.memory=true",
        ),
    )
    trace = tmp_path / "profile" / "trace_rank0.json"
    assert f"profile of rank 0: {trace}" in proc.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {n for n in names if n and n.startswith("train_step")} == {"train_step 2", "train_step 3"}
    assert "aten::mm" in names and "[memory]" in names  # operators, and allocations with memory=true


@pytest.mark.slow
def test_profile_only_on_the_chosen_rank(synthetic_corpus, tmp_path):
    run_pretrain(
        2,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus,
            tmp_path,
            "train.steps=2",
            "parallel.tensor=2",
            "train.profile.start_step=2",
            "train.profile.ranks=[1]",
        ),
    )
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["trace_rank1.json"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.profile.start_step=3", "train.profile.end_step=2"],
            "train.profile.end_step = 2 is before train.profile.start_step = 3",
        ),
        (["train.profile.end_step=2"], "train.profile.end_step needs train.profile.start_step"),
        (
            ["train.compile=[layers, mlp]"],
            "train.compile = ['layers', 'mlp']: `layers` compiles each whole layer, its mlp and norms too",
        ),
        (["train.compile=[attention]"], "train.compile[0] must be one of layers | mlp | norms, got 'attention'"),
    ],
)
def test_profile_and_compile_recipe_errors(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny_gpt", overrides)
    assert str(info.value) == message


def test_profile_ranks_must_exist():
    with pytest.raises(RecipeError, match=r"train.profile.ranks \[2\] are not ranks of a world of 2"):
        validate_for_world(load_recipe("tiny_gpt", ["train.profile.start_step=1", "train.profile.ranks=[0, 2]"]), 2)


def test_compile_wraps_the_chosen_modules(megatron_single_process):
    from model.config import ModelConfig
    from model.gpt import ModelBuild, build_model_chunks, compile_layers

    (chunk,) = build_model_chunks(ModelConfig(), ModelBuild(), 128)
    compile_layers(chunk, ("mlp", "norms"))
    for layer in chunk.decoder.layers:
        assert layer._compiled_call_impl is None  # the layer itself runs eagerly
        for module in (layer.mlp, layer.input_layernorm, layer.pre_mlp_layernorm):
            assert module._compiled_call_impl is not None
        assert layer.self_attention._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_layers_train_the_eager_curve(reference, synthetic_corpus, tmp_path):
    proc = run_pretrain(
        1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, "train.steps=3", "train.compile=[layers]")
    )
    assert "torch.compile: layers of every transformer layer" in proc.stdout
    assert_close_curves(read_metrics(tmp_path), reference[1][:3], rel=1e-5)
