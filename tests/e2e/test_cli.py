"""pretrain_gpt.py as users run it: user errors are one line on stderr with exit 2 (a traceback only
with --debug), and `--dry-run` prints the layout and parameter counts a hand count predicts."""

import concurrent.futures
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
USER_ERROR = 2

UNKNOWN_KEY = ["--recipe", "tiny_gpt", "model.hiden_size=3"]


def _run(args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, "pretrain_gpt.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


class _Runs:
    """Started commands by name; `runs[name]` waits for that one's result."""

    def __init__(self, futures, typo):
        self.futures, self.typo = futures, typo

    def __getitem__(self, name) -> subprocess.CompletedProcess:
        return self.futures[name].result()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command of this module, started at once two at a time (each pays megatron's import),
    keyed by name; a test waits only for its own."""
    from data.preprocess import build_synthetic_corpus

    tmp = tmp_path_factory.mktemp("cli")
    syn = tmp / "syn" / "text_document"
    syn.parent.mkdir()
    build_synthetic_corpus(str(syn), num_docs=200)
    typo = tmp / "typo.yaml"
    typo.write_text("base: tiny_gpt\nparalel:\n  tensor: 1\n")
    logs = ["logging.wandb.mode=disabled", f"logging.dir={tmp / 'logs'}"]
    commands = {
        # slowest first, so the pool's two workers stay busy
        "no_data": ["--recipe", "tiny_gpt", "data.path=/nonexistent/x", *logs],
        "transformer_engine": [
            "--recipe",
            "tiny_gpt",
            f"data.path={syn}",
            "model.transformer_impl=transformer_engine",
            *logs,
        ],
        "llama70b_512": ["--recipe", "llama70b", "--dry-run", "--world-size", "512"],
        "tiny_tp2_pp2": [
            "--recipe",
            "tiny_gpt",
            "--dry-run",
            "--world-size",
            "8",
            "parallel.tensor=2",
            "parallel.pipeline=2",
        ],
        "llama70b_100": ["--recipe", "llama70b", "--dry-run", "--world-size", "100"],
        "mixtral_64": ["--recipe", "mixtral_8x7b", "--dry-run", "--world-size", "64"],
        "deepseek_64": ["--recipe", "deepseek_moe_16b", "--dry-run", "--world-size", "64"],
        "unknown_key": UNKNOWN_KEY,
        "unknown_key_debug": ["--debug", *UNKNOWN_KEY],
        "missing_recipe": ["--recipe", "nope"],
        "typo_file": ["--recipe", str(typo)],
    }
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_run, args) for name, args in commands.items()}
    yield _Runs(futures, typo)
    pool.shutdown(wait=True, cancel_futures=True)


def _user_error(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a run that failed on user input."""
    assert proc.returncode == USER_ERROR, f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == "", proc.stdout
    return lines[0]


def _ok(proc: subprocess.CompletedProcess) -> list:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout.splitlines()


# ------------------------------------------------------------------------------------- user errors


def test_unknown_override_key_suggests_the_closest(runs):
    assert _user_error(runs["unknown_key"]) == (
        "error: unknown key 'model.hiden_size' on the command line; did you mean 'model.hidden_size'?"
    )


def test_debug_shows_the_traceback(runs):
    proc = runs["unknown_key_debug"]
    assert proc.returncode not in (0, USER_ERROR), proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "common.errors.RecipeError: unknown key 'model.hiden_size' on the command line; "
        "did you mean 'model.hidden_size'?"
    )


def test_missing_recipe(runs):
    line = _user_error(runs["missing_recipe"])
    assert line.startswith("error: recipe 'nope' not found")
    assert line == (
        "error: recipe 'nope' not found: looked for nope, recipes/nope, recipes/nope.yaml; "
        "recipes: deepseek_moe_16b, llama70b, llama_1b, llama_3b, mixtral_8x7b, tiny_gpt, tiny_moe"
    )


def test_recipe_file_typo_names_the_file_and_the_key(runs):
    assert _user_error(runs["typo_file"]) == (f"error: unknown key 'paralel' in {runs.typo}; did you mean 'parallel'?")


def test_layout_that_does_not_divide_the_world(runs):
    assert _user_error(runs["llama70b_100"]) == (
        "error: parallel.tensor × parallel.pipeline × parallel.context = 64 does not divide the world size 100"
    )


def test_missing_data_file(runs):
    assert _user_error(runs["no_data"]) == (
        "error: data file '/nonexistent/x.bin' not found: "
        "build it with 'python -m data.preprocess text --input FILES --output-prefix /nonexistent/x', "
        "or fix the data path"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None, reason="transformer-engine is installed here"
)
def test_transformer_engine_not_installed(runs):
    assert _user_error(runs["transformer_engine"]) == (
        "error: model.transformer_impl: transformer_engine needs transformer-engine, which is not "
        "installed: pip install -e '.[gpu]' on a CUDA machine, or set model.transformer_impl=local"
    )


# ---------------------------------------------------------------------------------------- dry runs


def _per_layer(h, f, heads, groups):
    """Weights of one Llama layer: q, k, v, o projections, gate/up/down, and the 2 norm vectors."""
    head_dim = h // heads
    matrices = h * heads * head_dim + 2 * h * groups * head_dim + heads * head_dim * h + 3 * h * f
    return matrices, 2 * h


def _expected_stages(*, layers, h, f, heads, groups, vocab, tp, pp, vpp):
    """(layer-range text, parameters per tensor-parallel rank) per pipeline stage, untied embeddings."""
    matrices, norms = _per_layer(h, f, heads, groups)
    chunks = vpp or 1
    per_chunk = layers // (pp * chunks)
    stages = []
    for p in range(pp):
        ranges = []
        for c in range(chunks):
            first = (c * pp + p) * per_chunk  # interleaved: chunk c of stage p is block c·pp + p
            ranges.append(f"{first}-{first + per_chunk - 1}")
        count = per_chunk * chunks * (matrices // tp + norms)
        if p == 0:
            count += vocab * h // tp  # input embedding, split over vocab
        if p == pp - 1:
            count += h + vocab * h // tp  # final norm (replicated) and output layer
        stages.append((", ".join(ranges), count))
    return stages


def _stage_lines(stages):
    return [
        f"  pipeline stage {p}: layers {ranges}; {count:,} parameters per rank"
        for p, (ranges, count) in enumerate(stages)
    ]


def test_llama70b_dry_run_on_512(runs):
    lines = _ok(runs["llama70b_512"])
    assert lines[1] == (
        "layout: world 512 = tensor 8 x pipeline 4 (x5 virtual) x context 2 (p2p) x data 8; expert 1, sequence parallel"
    )
    assert lines[2] == "micro-batches per step: 64"  # 512 / (micro 1 × data 8)
    assert lines[3] == "communication overlap: gradient reduce, parameter all-gather, pipeline send/receive"
    assert lines[4] == "vocabulary: 128256 (padded)"
    assert "70,553,706,496" in lines[5]
    assert lines[5] == "parameters: 70,553,706,496 total (70.55B; formula 70,553,706,496)"
    stages = _expected_stages(layers=80, h=8192, f=28672, heads=64, groups=8, vocab=128256, tp=8, pp=4, vpp=5)
    assert stages[0][0] == "0-3, 16-19, 32-35, 48-51, 64-67"
    assert lines[6:] == _stage_lines(stages)


def test_mixtral_dry_run_counts_total_and_active_parameters(runs):
    """Published Mixtral-8x7B: 46.7B parameters, 12.9B active per token (top-2 of 8 experts)."""
    lines = _ok(runs["mixtral_64"])
    assert lines[1] == (
        "layout: world 64 = tensor 2 x pipeline 4 x context 1 x data 8; expert 8 x expert tensor 1, sequence parallel"
    )
    h, f, layers, vocab = 4096, 14336, 32, 32000
    attention = h * (32 + 2 * 8) * 128 + 32 * 128 * h
    expert, router, norms = 3 * h * f, 8 * h, 2 * h
    total = layers * (attention + 8 * expert + router + norms) + h + 2 * vocab * h
    active = layers * (attention + 2 * expert + router + norms) + h + 2 * vocab * h
    assert (total, active) == (46_702_792_704, 12_879_925_248)
    assert lines[5] == f"parameters: {total:,} total (46.70B; formula {total:,})"  # built on meta = formula
    assert lines[6] == f"active parameters per token: {active:,} (12.88B; top-2 of 8 experts)"
    # Per rank of stage 1 (8 middle layers): attention split over tensor 2, one whole expert
    # (expert 8, expert tensor 1), the router and norms replicated.
    assert (
        lines[8]
        == f"  pipeline stage 1: layers 8-15; {8 * (attention // 2 + expert + router + norms):,} parameters per rank"
    )


def test_deepseek_moe_16b_dry_run_counts_total_and_active_parameters(runs):
    """Published DeepSeekMoE-16B: 16.4B parameters, 2.8B activated per token (64 fine-grained experts,
    top-6, 2 shared experts, the first layer dense, multi-head attention)."""
    lines = _ok(runs["deepseek_64"])
    assert lines[1] == "layout: world 64 = tensor 1 x pipeline 2 x context 1 x data 32; expert 8"
    h, vocab, layers, expert = 2048, 102400, 28, 3 * 2048 * 1408
    attention, norms = 4 * h * h, 2 * h
    dense_layer = attention + 3 * h * 10944 + norms
    shared, router = 3 * h * 2816, 64 * h
    total = dense_layer + (layers - 1) * (attention + 64 * expert + shared + router + norms) + h + 2 * vocab * h
    active = dense_layer + (layers - 1) * (attention + 6 * expert + shared + router + norms) + h + 2 * vocab * h
    assert (total, active) == (16_375_728_128, 2_828_650_496)
    assert f"parameters: {total:,} total (16.38B; formula {total:,})" in lines
    assert f"active parameters per token: {active:,} (2.83B; top-6 of 64 experts)" in lines


def test_tiny_gpt_dry_run_tensor_2_pipeline_2(runs):
    lines = _ok(runs["tiny_tp2_pp2"])
    assert lines[1] == "layout: world 8 = tensor 2 x pipeline 2 x context 1 x data 2; expert 1"
    assert lines[2] == "micro-batches per step: 2"  # 8 / (micro 2 × data 2)
    assert lines[3] == "communication overlap: gradient reduce"  # no distributed optimizer, no interleaving
    assert lines[4] == "vocabulary: 384 (padded)"  # 257 up to a multiple of lcm(128, tensor 2)
    matrices, norms = _per_layer(64, 176, 4, 2)
    total = 4 * (matrices + norms) + 64 + 2 * 384 * 64
    assert total == 234_048
    assert lines[5] == f"parameters: {total:,} total (0.23M; formula {total:,})"
    stages = _expected_stages(layers=4, h=64, f=176, heads=4, groups=2, vocab=384, tp=2, pp=2, vpp=None)
    assert [count for _, count in stages] == [58_624, 58_688]
    assert lines[6:] == _stage_lines(stages)
    # Across all ranks of one model replica every weight is held once, except the norms,
    # which each tensor-parallel rank holds in full.
    replicated = 4 * norms + 64
    assert sum(count for _, count in stages) * 2 == total + (2 - 1) * replicated
