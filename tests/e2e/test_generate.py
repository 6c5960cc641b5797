"""tools/generate.py against transformers' `generate`: a Hugging Face Llama (built locally, random
weights large enough that greedy decoding wanders over the vocabulary) imported, exported again by
tools/convert_hf.py, and decoded greedily by both from the same prompt gives the same text; the
same at a tensor × pipeline layout under torchrun; bad input is one line."""

import subprocess

import pytest
import torch

from tests.helpers.hf_families import llama_config
from tests.helpers.warm import run_python

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

VOCAB = 257  # the byte tokenizer's ids (given with --tokenizer: an import names none), padded to 384 on our side
EOD = 256
PROMPT = "The quick brown fox"
NEW_TOKENS = 48


def _run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [] if nproc == 1 else ["-m", "tests.helpers.forkrun", str(nproc)]  # torchrun's ranks, forked warm
    return run_python(launcher + args, env=_env(), timeout=300)


def _env() -> dict:
    import os

    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(our checkpoint imported from a random Llama, that checkpoint exported back to HF)."""
    config = llama_config(
        VOCAB,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # peaked logits: the greedy path changes id at most steps
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("generate")
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    for args in (("import", root / "hf", root / "ckpt"), ("export", root / "ckpt", root / "exported")):
        proc = _run(["-m", "tools.convert_hf", *map(str, args)])
        assert proc.returncode == 0, proc.stderr
    return root / "ckpt", root / "exported"


def _transformers_greedy(hf_dir) -> str:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).float().eval()
    prompt = torch.tensor([list(PROMPT.encode())])
    out = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOD, pad_token_id=EOD, num_beams=1
    )
    new = out[0, prompt.size(1) :].tolist()
    assert len(set(new)) > 10, new  # a wandering path: a wrong cache or position would show
    return bytes(i for i in new if i < 256).decode("utf-8", errors="replace")


def _ours(ckpt, nproc: int = 1, *layout: str) -> str:
    args = [
        "-m",
        "tools.generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--tokenizer",
        "byte",
    ]
    proc = _run([*args, "--max-new-tokens", str(NEW_TOKENS), *layout], nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(PROMPT) and proc.stdout.endswith("\n"), proc.stdout
    return proc.stdout[len(PROMPT) : -1]


@pytest.mark.slow
def test_greedy_equals_transformers_generate_on_the_export(converted):
    ckpt, exported = converted
    assert _ours(ckpt) == _transformers_greedy(exported)


@pytest.mark.slow
def test_greedy_at_tensor_2_pipeline_2_equals_one_process(converted):
    ckpt, exported = converted
    assert _ours(ckpt, 4, "--tensor", "2", "--pipeline", "2") == _transformers_greedy(exported)
