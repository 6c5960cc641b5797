"""tools/compare_runs.py: the table and plots from metrics.jsonl and wandb offline runs; a resumed
run keeps its wandb run id; bad input is one line and exit code 2."""

import json
import math
import os
import re

import pytest
from PIL import Image

from tests.helpers.runs import read_metrics, tiny_overrides
from tests.helpers.warm import run_python
from tools import compare_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(path, losses, tokens_per_s, **extra):
    path.mkdir(parents=True)
    rows = [
        dict(
            step=i + 1,
            loss=loss,
            grad_norm=1.0 / (i + 1),
            consumed_tokens=1024 * (i + 1),
            tokens_per_s=tokens_per_s[i],
            **extra,
        )
        for i, loss in enumerate(losses)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _assert_pngs(out_dir):
    for name in ("loss", "throughput", "grad_norm"):
        path = out_dir / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        with Image.open(path) as image:
            image.verify()
            assert image.size == (1100, 400)


def test_table_and_plots_from_metrics_files(tmp_path, capsys):
    _write_run(tmp_path / "a", [5.0, 4.0, float("nan"), 3.5], [100, 200, 300, 400])
    _write_run(tmp_path / "b", [5.0, 3.0, 3.2], [10, 20, 30], mfu=0.25)
    out = tmp_path / "plots"
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "run  steps  tokens  final loss  min loss (step)  tokens/s (median)  MFU (median)  skipped",
        "---  -----  ------  ----------  ---------------  -----------------  ------------  -------",
        "a    4      4,096   3.5000      3.5000 (4)       250                -             0",
        "b    3      3,072   3.2000      3.0000 (2)       20                 25.0%         0",
    ]
    assert lines[4:] == [f"wrote {out / name}.png" for name in ("loss", "throughput", "grad_norm")]
    _assert_pngs(out)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda tmp: tmp / "missing",
            "error: '{tmp}/missing' is not a run directory, a .wandb file or entity/project/run_id",
        ),
        (lambda tmp: tmp, "error: '{tmp}' holds no metrics.jsonl and no wandb run (run-*.wandb)"),
        (lambda tmp: _bad_jsonl(tmp), "error: {tmp}/bad/metrics.jsonl line 2 is not JSON: Expecting value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, message):
    proc = run_python(["-m", "tools.compare_runs", str(make(tmp_path)), "--out", str(tmp_path / "plots")], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [message.format(tmp=tmp_path)]
    assert proc.stdout == "" and not (tmp_path / "plots").exists()


def _bad_jsonl(tmp):
    (tmp / "bad").mkdir()
    (tmp / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    return tmp / "bad"


@pytest.mark.slow
def test_resumed_run_keeps_its_wandb_run_id(synthetic_corpus, tmp_path, capsys):
    """Two jobs of one run with wandb offline: the second resumes the first's wandb run (same id),
    and compare_runs reads the two offline parts back to the curve metrics.jsonl holds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "WANDB_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", WANDB_MODE="offline")
    for steps in (2, 4):
        overrides = tiny_overrides(synthetic_corpus, tmp_path, "checkpoint.load=auto", f"train.steps={steps}")
        overrides.remove("logging.wandb.mode=disabled")
        args = ["pretrain_gpt.py", "--recipe", "tiny_gpt", *overrides, "logging.wandb.mode=offline"]
        proc = run_python(args, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    parts = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{run_id}") for p in parts), parts
    assert all((p / f"run-{run_id}.wandb").is_file() for p in parts)

    from_wandb = compare_runs.read_run(str(tmp_path / "wandb"))
    expected = read_metrics(tmp_path)
    first_job = compare_runs.read_run(str(parts[0] / f"run-{run_id}.wandb"))  # one .wandb file alone
    assert [(r["step"], r["loss"]) for r in first_job] == [(r["step"], r["loss"]) for r in expected[:2]]
    assert [r["step"] for r in from_wandb] == [r["step"] for r in expected] == [1, 2, 3, 4]
    for got, want in zip(from_wandb, expected):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-12) and got["lr"] == want["lr"]
    assert (
        compare_runs.main(
            [str(tmp_path), str(tmp_path / "wandb"), "--labels", "jsonl,wandb", "--out", str(tmp_path / "plots")]
        )
        == 0
    )
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert rows[0].replace("jsonl", "wandb") == rows[1]  # the same numbers from either source
    _assert_pngs(tmp_path / "plots")
