"""pretrain_gpt.py as users run it: user errors are one line on stderr with exit 2 (a traceback only
with --debug), and `--dry-run` prints the layout and parameter counts a hand count predicts, and the
memory model's per-rank table (as text or JSON, with a fit verdict for a GPU's memory)."""

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import subprocess

import pytest

from tests.helpers.warm import run_python

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
USER_ERROR = 2

UNKNOWN_KEY = ["--recipe", "tiny_gpt", "model.hiden_size=3"]


def _run(args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    return run_python(["pretrain_gpt.py", *args], env=env, timeout=TIMEOUT_S)


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
        "llama70b_512": ["--recipe", "llama70b", "--dry-run", "--world-size", "512", "--gpu-memory-gib", "80"],
        "llama70b_512_json": ["--recipe", "llama70b", "--dry-run", "--world-size", "512", "--json"],
        "tiny_memory": ["--recipe", "tiny_gpt", "--dry-run", "train.device=cpu", "--gpu-memory-gib", "0.007"],
        "tiny_memory_json": [
            "--recipe",
            "tiny_gpt",
            "--dry-run",
            "train.device=cpu",
            "--json",
            "--gpu-memory-gib",
            "0.007",
        ],
        "json_without_dry_run": ["--recipe", "tiny_gpt", "--json"],
        "zero_gpu_memory": ["--recipe", "tiny_gpt", "--dry-run", "--gpu-memory-gib", "0"],
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
        "recipes: deepseek_moe_16b, deepseek_v3, llama70b, llama_1b, llama_3b, mixtral_8x7b, qwen3_30b_a3b, tiny_deepseek, tiny_gpt, tiny_moe, tiny_qwen3_moe"
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
        "installed: pip install '.[gpu]' on a CUDA machine, or set model.transformer_impl=local"
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
    assert lines[6:10] == _stage_lines(stages)
    memory = lines[10:]
    assert memory[1].split() == "stage ranks weights grads optimizer buffers activations logits transient peak".split()
    assert [row.split()[:2] for row in memory[2:6]] == [
        ["0", "0-127"],
        ["1", "128-255"],
        ["2", "256-383"],
        ["3", "384-511"],
    ]
    assert memory[6].startswith("worst: pipeline stage 0 (ranks 0-127), peak ")
    assert memory[6].endswith(" GiB (23 model-chunk micro-batches in flight)")  # warm-up (4 - 1)·2 + (5 - 1)·4, plus 1
    assert memory[7].startswith("fits in 80 GiB: peak ")


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
    assert lines[6:8] == _stage_lines(stages)
    # Across all ranks of one model replica every weight is held once, except the norms,
    # which each tensor-parallel rank holds in full.
    replicated = 4 * norms + 64
    assert sum(count for _, count in stages) * 2 == total + (2 - 1) * replicated


def test_llama70b_dry_run_json_has_the_worst_rank_and_every_stage(runs):
    (line,) = _ok(runs["llama70b_512_json"])  # one JSON object, nothing else on stdout
    report = json.loads(line)
    memory = report["memory"]
    stages = memory["stages"]
    assert [s["ranks"] for s in stages] == [[0, 127], [128, 255], [256, 383], [384, 511]]
    worst = max(stages, key=lambda s: s["peak_gib"])
    assert memory["worst_ranks"] == worst["ranks"] and memory["peak_gib"] == worst["peak_gib"]
    for key in ("weights_gib", "grads_gib", "optimizer_gib", "activations_gib"):
        assert memory[key] == worst[key]
    # bf16 weights, fp32 gradient buffers: twice the bytes; Adam's 12 bytes per parameter over data 8 × context 2
    assert memory["grads_gib"] == pytest.approx(2 * memory["weights_gib"], abs=1e-3)
    assert memory["optimizer_gib"] == pytest.approx(memory["weights_gib"] * 6 / 16, abs=1e-3)
    assert report["parameters"]["total"] == 70_553_706_496


# The dry run of tiny_gpt on one CPU process (train.device=cpu: the kernels the memory model was
# validated with), byte for byte. Weights 234,048 × 4 bytes = 0.89 MiB, the same again for the fp32
# gradient buffer and twice for Adam's moments; the activation terms are checked against a real
# forward in tests/unit/test_memory.py. 0.007 GiB = 7.17 MiB is too little without recompute.
TINY_MEMORY = [
    "memory per rank (MiB, cpu kernels; docs/memory.md): weights, gradient buffers, optimizer state, "
    "communication buffers, activations held (of which logits/loss), largest transient, peak",
    "  stage  ranks        weights    grads  optimizer  buffers  activations   logits  transient     peak",
    "  0      0              0.89     0.89       1.79     0.00         6.78     0.57       0.09    10.44",
]
TINY_WORST = "worst: pipeline stage 0 (rank 0), peak 10.44 MiB (1 micro-batch in flight)"
TINY_VERDICT = [
    "does not fit in 0.007 GiB by 3.28 MiB: peak 10.44 MiB",
    # the least recomputed forward that fits: both norms and the MLPs (no attention)
    "cheapest recompute that fits: model.recompute_granularity=selective model.recompute_modules=[layernorm,mlp] "
    "(needs 6.82 MiB; recomputes 55.9 % of the forward)",
]
TINY_JSON = {
    "weights_gib": 0.000872,
    "grads_gib": 0.000872,
    "optimizer_gib": 0.001744,
    "activations_gib": 0.00662,
    "peak_gib": 0.010199,
    "worst_ranks": [0, 0],
    "fits": False,
    "short_by_gib": 0.003199,
    "cheapest_recompute": {
        "overrides": ["model.recompute_granularity=selective", "model.recompute_modules=[layernorm,mlp]"],
        "needed_gib": 0.006657,
        "extra_forward": 0.5593,
    },
}


def test_tiny_gpt_memory_table_and_verdict(runs):
    lines = _ok(runs["tiny_memory"])
    assert lines[7:10] == TINY_MEMORY
    assert lines[10] == TINY_WORST
    # then a `data:` and a `not runnable here:` line when the quickstart corpus has not been built on this machine
    assert [line for line in lines[11:] if not line.startswith(("data: ", "not runnable here: "))] == TINY_VERDICT


def test_tiny_gpt_memory_json(runs):
    (line,) = _ok(runs["tiny_memory_json"])
    memory = json.loads(line)["memory"]
    assert {k: memory[k] for k in TINY_JSON} == TINY_JSON


def test_memory_flags_need_a_dry_run(runs):
    assert _user_error(runs["json_without_dry_run"]) == "error: --json is a --dry-run option: add --dry-run"
    assert _user_error(runs["zero_gpu_memory"]) == "error: --gpu-memory-gib must be positive, got 0"
