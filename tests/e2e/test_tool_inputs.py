"""The tools' bad inputs of issue 28: one line, exit code 2, what a person needs to fix it. A path
that is not a checkpoint gets the same words from every tool; a Hugging Face folder that does not
exist, a truncated model.safetensors, a shard its index names but that is missing; a closed stdout
(`| head -1`) ends a tool quietly; a plan with no layout for the GPUs and a dry run that would not
run here say why. The entry points' `main` runs in this process where it can."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.e2e.test_bad_input import _one_line, _script
from tests.helpers.runs import REPO


@pytest.fixture(autouse=True)
def _process_restored():
    """In-process tools set MASTER_ADDR/MASTER_PORT, turn the CPU layer on and may leave a process
    group: all undone after each test."""
    from parallel.layout import shutdown
    from upstream import cpu

    saved = dict(os.environ)
    yield
    shutdown()
    os.environ.clear()
    os.environ.update(saved)
    cpu.disable()


def _every_tool_says(capsys, path: pathlib.Path, corpus: str, tmp_path: pathlib.Path) -> str:
    """The one line of generate, convert_hf export and pretrain_gpt (checkpoint.load) for `path`,
    asserted equal."""
    from pretrain.cli import main as pretrain_main

    generate, convert = _script("generate"), _script("convert_hf")
    said = {
        _one_line(capsys, generate.main, ["--checkpoint", str(path), "--prompt", "x"]),
        _one_line(capsys, convert.main, ["export", str(path), str(tmp_path / "hf")]),
        _one_line(
            capsys,
            pretrain_main,
            [
                "--recipe",
                "tiny_gpt",
                f"data.path={corpus}",
                f"logging.dir={tmp_path / 'run'}",
                "logging.wandb.mode=disabled",
                f"checkpoint.load={path}",
            ],
        ),
    }
    assert len(said) == 1, said
    return said.pop()


def test_a_run_folder_for_a_checkpoint_gets_the_same_suggestion_everywhere(capsys, tmp_path, synthetic_corpus):
    run = tmp_path / "myrun"
    (run / "checkpoints").mkdir(parents=True)
    line = _every_tool_says(capsys, run, synthetic_corpus, tmp_path)
    assert line == f"error: checkpoint '{run}' is a run folder: did you mean '{run / 'checkpoints'}'?"


def test_a_checkpoint_that_does_not_exist_is_called_so_everywhere(capsys, tmp_path, synthetic_corpus):
    line = _every_tool_says(capsys, tmp_path / "nowhere", synthetic_corpus, tmp_path)
    assert line == f"error: checkpoint '{tmp_path / 'nowhere'}' does not exist"


# ---- convert_hf import ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama saved by transformers twice: one model.safetensors, and shards with an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    root = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def test_import_of_a_folder_that_does_not_exist(capsys, tmp_path):
    convert = _script("convert_hf")
    line = _one_line(capsys, convert.main, ["import", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert line == f"error: {tmp_path / 'nowhere'} does not exist"


def test_import_of_a_truncated_model_safetensors(capsys, tiny_llama, tmp_path):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(tiny_llama / "single", hf)
    size = (hf / "model.safetensors").stat().st_size
    os.truncate(hf / "model.safetensors", size // 2)
    convert = _script("convert_hf")
    line = _one_line(capsys, convert.main, ["import", str(hf), str(tmp_path / "out")])
    assert line == f"error: {hf / 'model.safetensors'} is truncated from {size} to {size // 2} bytes"


def test_import_names_the_missing_shard_from_the_index(capsys, tiny_llama, tmp_path):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(tiny_llama / "sharded", hf)
    weight_map = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    held = sorted(t for t, s in weight_map.items() if s == shard)
    (hf / shard).unlink()
    convert = _script("convert_hf")
    line = _one_line(capsys, convert.main, ["import", str(hf), str(tmp_path / "out")])
    assert line == (
        f"error: {hf / shard} does not exist: model.safetensors.index.json names it for {len(held)} tensors "
        f"(e.g. {[t for t, s in weight_map.items() if s == shard][0]})"
    )


def _config_edited(**changes):
    def edit(hf: pathlib.Path) -> pathlib.Path:
        config = json.loads((hf / "config.json").read_text())
        config.update(changes)
        (hf / "config.json").write_text(json.dumps(config))
        return hf

    return edit


# (how the copy of the tiny Llama is spoiled -> the path given to import, the line after "error: {hf}")
BAD_HF_DIRS = {
    "another architecture": (
        _config_edited(architectures=["GemmaForCausalLM"]),
        "/config.json: architectures ['GemmaForCausalLM'] not supported; expected one of ['DeepseekV3ForCausalLM', "
        "'LlamaForCausalLM', 'MixtralForCausalLM', 'Qwen3ForCausalLM', 'Qwen3MoeForCausalLM']",
    ),
    "config.json for more layers than the files hold": (
        _config_edited(num_hidden_layers=3),
        ": Hugging Face checkpoint lacks 9 tensor(s) Llama needs: model.layers.2.input_layernorm.weight, "
        "model.layers.2.mlp.down_proj.weight, model.layers.2.mlp.gate_proj.weight, … (6 more)",
    ),
    "an odd head width": (  # before: a shape mismatch of the first tensor read, named by our key
        _config_edited(head_dim=15),
        "/config.json describes a model that cannot be built: model.head_dim = 15 must be even: RoPE rotates pairs "
        "of each head's channels",
    ),
    "its config.json for the folder": (
        lambda hf: hf / "config.json",
        "/config.json is not a folder: give the Hugging Face model's folder (with config.json)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HF_DIRS))
def test_import_of_a_spoiled_hf_dir_names_the_file(capsys, tiny_llama, tmp_path, case):
    import shutil

    spoil, message = BAD_HF_DIRS[case]
    hf = tmp_path / "hf"
    shutil.copytree(tiny_llama / "single", hf)
    line = _one_line(capsys, _script("convert_hf").main, ["import", str(spoil(hf)), str(tmp_path / "out")])
    assert line == f"error: {hf}{message}"
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_a_hugging_face_model(capsys, tiny_llama, tmp_path):
    """Before: the export wrote its config.json and model.safetensors over the model there. The
    folder is checked before the checkpoint is read."""
    hf = tiny_llama / "single"
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    line = _one_line(capsys, _script("convert_hf").main, ["export", str(tmp_path / "ckpt"), str(hf)])
    assert (
        line
        == f"error: {hf} already holds a Hugging Face model (config.json, model.safetensors): choose an empty directory"
    )
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before


# ---- a closed stdout, tools.plan_layout, --dry-run ----------------------------------------------------


TOOLS_INTO_A_PIPE = {
    "plan": ["-m", "tools.plan_layout", "--recipe", "tiny_gpt", "--gpus", "2", "--gpu-memory-gib", "80"],
    "inspect": ["-m", "tools.inspect_data", "--recipe", "tiny_gpt", "--step", "1"],
}


@pytest.mark.parametrize("tool", [pytest.param("inspect", marks=pytest.mark.slow), "plan"])
def test_a_tool_into_a_closed_pipe_exits_quietly(tool, synthetic_corpus, tmp_path):
    """`python -m tools.inspect_data ... | head -1`: the reader is gone before the tool writes (its end of
    the pipe is closed at once), so the write fails for certain. Before: a BrokenPipeError traceback.
    Exit code 141 (128 + SIGPIPE), as a shell reports for a C tool."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    cmd = [sys.executable, *TOOLS_INTO_A_PIPE[tool], f"data.path={synthetic_corpus}", f"logging.dir={tmp_path}"]
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-3000:]


def test_plan_with_no_layout_for_the_gpus(capsys):
    from tools.plan_layout import main

    line = _one_line(capsys, main, ["--recipe", "tiny_gpt", "--gpus", "7", "--gpu-memory-gib", "80"])
    assert line == (
        f"error: no parallel layout of 7 GPUs exists for {REPO / 'recipes' / 'tiny_gpt.yaml'}: tensor must divide "
        "the 4 heads, 2 query groups and 8 GPUs per node, pipeline at most the 4 layers, and the data-parallel size that "
        "leaves (7) must divide train.global_batch_size 8: use another --gpus"
    )


def test_plan_without_gpu_memory_takes_the_gpus_own(capsys):
    """Before: argparse's "the following arguments are required: --gpu-memory-gib", where
    `--dry-run --gpu` takes the GPU's own memory."""
    from tools.plan_layout import main

    assert main(["--recipe", "tiny_gpt", "--gpus", "1", "--gpu", "h200", "--top", "1"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith(f"{REPO / 'recipes' / 'tiny_gpt.yaml'} on 1 x h200 (139.7 GiB): "), head


def test_dry_run_names_what_would_stop_the_real_run(capsys, tmp_path):
    from pretrain.cli import main

    argv = ["--recipe", "tiny_gpt", "--dry-run", f"data.path={tmp_path}/x", "data.tokenizer=/nowhere/tokenizer"]
    assert main([*argv, "model.vocab_size=256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("layout: world 1 = tensor 1")
    assert any(line.startswith("worst: ") for line in lines)  # the memory table is still there
    assert lines[-1] == (
        f"not runnable here: data file '{tmp_path}/x.bin' not found; data.tokenizer '/nowhere/tokenizer' not found"
    )
    assert main(["--recipe", "tiny_gpt", "--dry-run", "data.path=null"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "not runnable here: no training data (data.path and data.blend are null)"
    )


def test_a_run_folder_for_a_recipe_suggests_its_recipe_yaml(capsys, tmp_path):
    from pretrain.cli import main as pretrain_main
    from tools.inspect_data import main as inspect_main

    run = tmp_path / "myrun"
    run.mkdir()
    (run / "recipe.yaml").write_text("base: tiny_gpt\n")
    expected = f"error: recipe '{run}' is a folder, not a recipe file: did you mean '{run / 'recipe.yaml'}'?"
    assert _one_line(capsys, inspect_main, ["--recipe", str(run), "--step", "1"]) == expected
    assert _one_line(capsys, pretrain_main, ["--recipe", str(run), "--dry-run"]) == expected


# ---- tools.generate under torchrun -----------------------------------------------------------------


def test_generate_at_tensor_2_refuses_experts_in_its_own_terms(monkeypatch):
    """Before: the recipe check's "needs parallel.sequence_parallel = true", a key generate has no way
    to set (and its static generation refuses sequence parallelism)."""
    from common.errors import UserError
    from pretrain.recipe import load_recipe
    from tools.generate import build_generator_model

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as refused:
        build_generator_model(load_recipe("tiny_moe", []).model, 384, tensor=2, pipeline=1)
    assert str(refused.value) == (
        "--tensor 2: a model with experts generates at --tensor 1 only (megatron-core's MoE layer needs sequence "
        "parallelism at tensor > 1, which its static generation refuses): split it with --pipeline"
    )


def test_generate_from_an_import_asks_for_its_tokenizer(capsys, tiny_llama, tmp_path):
    """Before: the import's recipe (its model section only) defaulted to the byte tokenizer, so a
    Hugging Face model generated through the wrong tokenizer without a word."""
    convert, generate = _script("convert_hf"), _script("generate")
    assert convert.main(["import", str(tiny_llama / "single"), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    line = _one_line(capsys, generate.main, ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x"])
    assert line == (
        f"error: checkpoint '{tmp_path / 'ckpt' / 'iter_0000000'}' was imported from Hugging Face and names no "
        "tokenizer: give the model's with --tokenizer (its folder or its tokenizer.json)"
    )
