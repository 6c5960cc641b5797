"""Bad input to every entry point is one `error:` line and exit code 2, never a traceback: a corpus
built for another tokenizer, a GPU asked for where there is none, paths that cannot be read or
written, malformed files the tools read, a mistyped recipe, a missing quickstart corpus; and the
smaller frictions a newcomer hit (`--input` given twice, the dry run on missing data).

Most cases run the entry point's `main` in this process (its one line is what it prints; an
exception escaping it fails the test); the ones that train start a process of their own."""

import importlib
import os
import subprocess

import pytest

from tests.helpers.runs import tiny_overrides
from tests.helpers.warm import run_python

USER_ERROR = 2


def _script(name: str):
    return importlib.import_module(f"tools.{name}")


def _one_line(capsys, main, argv) -> str:
    """Runs an entry point's main: exit code 2 and exactly one `error:` line on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == USER_ERROR and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@pytest.fixture(autouse=True)
def _process_restored():
    """An in-process training start sets MASTER_ADDR/MASTER_PORT (parallel/layout.py), which must
    not reach the processes later tests start, and turns the CPU layer on for the process, which the
    upstream site tests (tests/unit/test_upstream_cpu.py) need off."""
    from upstream import cpu

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    cpu.disable()


@pytest.fixture
def a_file(tmp_path):
    """A plain file: a folder below it can neither be created nor written (as root too)."""
    path = tmp_path / "plain_file"
    path.write_text("x")
    return path


# ---- pretrain_gpt.py ------------------------------------------------------------------------------


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    return run_python(args, env=env, timeout=300)


def _single_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == USER_ERROR and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    return lines[0]


def test_corpus_of_another_tokenizer_is_one_line(tmp_path):
    """Ids up to 999 (a 1000-id tokenizer's corpus) trained with the byte tokenizer: the embedding
    would raise IndexError on ids >= 384; the step's check names the file and document first."""
    from data.preprocess import write_indexed

    prefix = str(tmp_path / "bpe" / "text_document")
    write_indexed(([i % 1000 for i in range(d, d + 300)] for d in range(0, 40000, 300)), prefix, vocab_size=1000)
    proc = _pretrain("pretrain_gpt.py", "--recipe", "tiny_gpt", *tiny_overrides(prefix, tmp_path / "run"))
    line = _single_error_line(proc)
    assert line.startswith(f"error: data file '{prefix}.bin' (documents ")
    assert "outside the model's 257 ids: it was built with another tokenizer than data.tokenizer" in line


@pytest.mark.slow  # the launcher's own process and its ranks' fresh interpreters
def test_launcher_passes_a_bad_device_on_as_exit_2(tmp_path, synthetic_corpus):
    proc = _pretrain(
        "-m",
        "pretrain.launch",
        "--standalone",
        "--nproc_per_node=1",
        "pretrain_gpt.py",
        "--recipe",
        "tiny_gpt",
        *tiny_overrides(synthetic_corpus, tmp_path / "run", "train.device=cuda"),
    )
    assert proc.returncode == USER_ERROR and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: train.device = cuda but this machine has no usable GPU (torch " in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_a_gpu(capsys, tmp_path, synthetic_corpus):
    from pretrain.cli import main

    line = _one_line(
        capsys, main, ["--recipe", "tiny_gpt", *tiny_overrides(synthetic_corpus, tmp_path, "train.device=cuda")]
    )
    assert line.endswith("CPU-only build): use train.device=cpu or auto")


@pytest.mark.parametrize("key", ["logging.dir", "data.cache_dir", "checkpoint.dir"])
def test_output_folder_that_cannot_be_created(capsys, tmp_path, a_file, synthetic_corpus, key):
    from pretrain.cli import main

    overrides = tiny_overrides(synthetic_corpus, tmp_path / "run", f"{key}={a_file}/sub")
    line = _one_line(capsys, main, ["--recipe", "tiny_gpt", *overrides])
    assert line == f"error: {key} '{a_file}/sub' cannot be created: '{a_file}' is a file, not a folder"


def test_mistyped_recipe_gets_did_you_mean_and_the_list(capsys):
    from pretrain.cli import main

    line = _one_line(capsys, main, ["--recipe", "tiny_gtp"])
    assert line == (
        "error: recipe 'tiny_gtp' not found: looked for tiny_gtp, recipes/tiny_gtp, recipes/tiny_gtp.yaml; "
        "did you mean 'tiny_gpt'? recipes: deepseek_moe_16b, deepseek_v3, llama70b, llama_1b, llama_3b, mixtral_8x7b, qwen3_30b_a3b, tiny_deepseek, tiny_gpt, tiny_moe, tiny_qwen3_moe"
    )


def test_missing_quickstart_corpus_names_its_command(capsys, tmp_path):
    from pretrain.cli import main

    prefix = tmp_path / "runs" / "quickstart" / "corpus" / "text_document"
    line = _one_line(capsys, main, ["--recipe", "tiny_gpt", *tiny_overrides(str(prefix), tmp_path / "run")])
    assert line == (
        f"error: data file '{prefix}.bin' not found: build it with 'python -m data.preprocess quickstart "
        f"--output-prefix {prefix}' (or bash scripts/quickstart.sh), or fix the data path"
    )


def test_dry_run_says_when_the_data_is_not_here(tmp_path):
    from planning.dry_run import missing_data
    from pretrain.recipe import load_recipe

    assert missing_data(load_recipe("tiny_gpt", [f"data.path={tmp_path}/x"])) == [
        f"data: '{tmp_path}/x.bin/.idx' not found on this machine: build it with 'python -m data.preprocess "
        f"text --input FILES --output-prefix {tmp_path}/x'"
    ]


# The new keys' wrong values, misspellings and combinations: one line each, through the dry run
# (the checks run before anything is built). (recipe, overrides, the line after "error: ").
NEW_KEYS = [
    ("tiny_gpt", ["model.head_dim=15"], "model.head_dim = 15 must be even: RoPE rotates pairs of each head's channels"),
    (
        "tiny_gpt",
        ["model.hidden_size=60"],
        "model.hidden_size / model.num_attention_heads = 15 must be even: RoPE rotates pairs of each head's channels",
    ),
    (
        "tiny_deepseek",
        ["model.mla.qk_pos_emb_head_dim=7"],
        "model.mla.qk_pos_emb_head_dim = 7 must be even: RoPE rotates pairs of each head's channels",
    ),
    (
        "tiny_gpt",
        ["model.mla.q_lora_rank=32"],
        "model.mla.q_lora_rank = 32 applies to model.attention = mla only, got model.attention = standard: set "
        "model.attention = mla, or leave model.mla out",
    ),
    (
        "tiny_deepseek",
        ["model.mla.kv_rank=4"],
        "unknown key 'model.mla.kv_rank' on the command line; did you mean 'model.mla.kv_lora_rank'?",
    ),
    (
        "tiny_deepseek",
        ["model.mtp_num_layers=1.5"],
        "wrong type for 'model.mtp_num_layers' on the command line: expected an integer, got 1.5",
    ),
    (
        "tiny_deepseek",
        ["model.moe.num_groups=8", "model.moe.group_top_k=1"],
        "model.moe.top_k = 2 exceeds the experts a token can reach: model.moe.group_top_k × experts per group "
        "(model.moe.num_experts / num_groups) = 1 × 1",
    ),
    (
        "tiny_moe",
        ["model.moe.grouped_gemm=yes"],
        "wrong type for 'model.moe.grouped_gemm' on the command line: expected true or false, got the string 'yes'",
    ),
    (
        "tiny_gpt",
        ["data.reset_position_id=true"],
        "unknown key 'data.reset_position_id' on the command line; did you mean 'data.reset_position_ids'?",
    ),
    ("tiny_gpt", ["optimizer.ns_steps=3"], "optimizer.ns_steps is a Muon key: set optimizer.name = muon to use it"),
    (
        "tiny_moe",
        ["optimizer.name=muon", "model.moe.grouped_gemm=true", "model.transformer_impl=transformer_engine"],
        "optimizer.name = muon with model.moe.grouped_gemm = true is not built for model.transformer_impl = "
        "transformer_engine (its per-expert fc1 weights are not split [gate; up]); set model.transformer_impl = "
        "local or model.moe.grouped_gemm = false",
    ),
    (
        "tiny_gpt",
        ["optimizer.cpu_offlaod=true"],
        "unknown key 'optimizer.cpu_offlaod' on the command line; did you mean 'optimizer.cpu_offload'?",
    ),
    (
        "tiny_gpt",
        ["parallel.fsdp_shard_size=2.5", "parallel.fsdp=zero3"],
        "wrong type for 'parallel.fsdp_shard_size' on the command line: expected an integer or a string or null, got 2.5",
    ),
    (
        "tiny_gpt",
        ["parallel.tp_comm_overlap=true"],
        "parallel.tp_comm_overlap = true overlaps the sequence-parallel all-gathers and reduce-scatters: set "
        "parallel.sequence_parallel = true (and parallel.tensor > 1)",
    ),
    (
        "deepseek_v3",
        [],
        "parallel.tensor × parallel.pipeline × parallel.context = 16 does not divide the world size 1 (--dry-run "
        "plans for WORLD_SIZE or 1 process: give the planned size with --world-size N)",
    ),
]


@pytest.mark.parametrize("recipe, overrides, message", NEW_KEYS, ids=[" ".join(c[1]) or c[0] for c in NEW_KEYS])
def test_new_keys_bad_values_are_one_line(capsys, monkeypatch, recipe, overrides, message):
    from pretrain.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _one_line(capsys, main, ["--recipe", recipe, "--dry-run", *overrides]) == f"error: {message}"


def test_a_plain_run_of_a_layout_for_more_processes_says_how_to_launch(capsys, monkeypatch, tmp_path, synthetic_corpus):
    from pretrain.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--recipe", "tiny_gpt", *tiny_overrides(synthetic_corpus, tmp_path, "parallel.tensor=2")]
    assert _one_line(capsys, main, argv) == (
        "error: parallel.tensor × parallel.pipeline × parallel.context = 2 does not divide the world size 1 (a plain "
        "`python` run is 1 process: launch the planned number with torchrun, or check it with --dry-run --world-size N)"
    )


# ---- data.preprocess, tools.inspect_data -----------------------------------------------------------


def test_preprocess_output_under_a_file(capsys, a_file):
    from data.preprocess import main

    line = _one_line(capsys, main, ["synthetic", "--output-prefix", f"{a_file}/corpus/text_document"])
    assert line == f"error: '{a_file}/corpus': Not a directory"


def test_preprocess_reads_every_input_given(tmp_path):
    from data.preprocess import main

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"document {name}")
    prefix = tmp_path / "out" / "text_document"
    args = ["text", "--input", str(tmp_path / "a.txt"), "--input", str(tmp_path / "b.txt")]
    assert main([*args, "--output-prefix", str(prefix)]) == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(str(prefix))) == 2


def test_inspect_bad_step_and_missing_data(capsys, tmp_path):
    from tools.inspect_data import main

    line = _one_line(capsys, main, ["--recipe", "tiny_gpt", "--step", "0"])
    assert line == "error: --step must be at least 1 (steps count from 1, as in metrics.jsonl), got 0"
    line = _one_line(capsys, main, ["--recipe", "tiny_gpt", f"data.path={tmp_path}/x", "--step", "1"])
    assert line.startswith(f"error: data file '{tmp_path}/x.bin' not found: build it with")


# ---- tools/convert_hf.py, tools/generate.py, tools/compare_runs.py ---------------------------------


def test_convert_hf_malformed_config_and_unwritable_output(capsys, tmp_path, a_file, reference):
    convert = _script("convert_hf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    line = _one_line(capsys, convert.main, ["import", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    assert line.startswith(f"error: {tmp_path / 'hf' / 'config.json'} is not valid JSON: ")
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    line = _one_line(capsys, convert.main, ["import", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    assert line == f"error: {tmp_path / 'hf' / 'config.json'} has no 'num_attention_heads'"
    log_dir, _ = reference
    line = _one_line(capsys, convert.main, ["export", str(log_dir / "checkpoints"), f"{a_file}/hf"])
    assert line == f"error: '{a_file}/hf': Not a directory"


def test_generate_bad_arguments_and_paths(capsys, tmp_path):
    generate = _script("generate")
    base = ["--checkpoint", str(tmp_path), "--prompt", "x"]
    assert _one_line(capsys, generate.main, [*base, "--top-p", "0"]) == "error: --top-p must be in (0, 1], got 0.0"
    line = _one_line(capsys, generate.main, ["--checkpoint", str(tmp_path / "none"), "--prompt", "x"])
    assert line == f"error: checkpoint '{tmp_path / 'none'}' does not exist"
    line = _one_line(capsys, generate.main, base)
    assert line == (
        f"error: checkpoint '{tmp_path}' is neither a checkpoints folder (with 'latest') nor a checkpoint like "
        "iter_0000100"
    )


def test_compare_runs_damaged_wandb_file_and_unwritable_plots(capsys, tmp_path, a_file):
    compare = _script("compare_runs")
    damaged = tmp_path / "run-x.wandb"
    damaged.write_bytes(b":W&B\x00\x00\x00" + bytes([0, 0, 0, 0, 5, 0, 1]) + b"\xff\xff\xff\xff\xff")
    line = _one_line(capsys, compare.main, [str(damaged)])
    assert line == f"error: {damaged} holds a record that is not a wandb record: the file is damaged"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    line = _one_line(capsys, compare.main, [str(run), "--out", f"{a_file}/plots"])
    assert line == f"error: '{a_file}/plots': Not a directory"
