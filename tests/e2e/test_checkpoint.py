"""Checkpoints: resume at another layout equals the uninterrupted run, a crash mid-save leaves the
previous checkpoint in charge, retention, and loading never unpickles arbitrary objects."""

import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.errors import UserError
from pretrain.checkpoint import manifest, storage
from tests.helpers.runs import (
    MASKED,
    REPO,
    TINY_STEPS,
    assert_close_curves,
    assert_close_validation,
    read_metrics,
    run_pretrain,
    tiny_overrides,
)

# fp32 on CPU: a layout change only reorders additions of the same numbers (measured ≤ 7.5e-7).
REL = 1e-5
HALF = TINY_STEPS // 2  # saved at this step at one layout, resumed to TINY_STEPS at another


@pytest.mark.slow
def test_20_steps_equal_10_at_tp2_pp2_then_10_at_tp1_pp1(synthetic_corpus, tmp_path):
    """The headline case at full length: model, optimizer, schedule and data position carry over."""
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path / "whole", "train.steps=20"))
    run_pretrain(
        4,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus, tmp_path / "split", "train.steps=10", "parallel.tensor=2", "parallel.pipeline=2"
        ),
    )
    proc = run_pretrain(
        1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path / "split", "train.steps=20", "checkpoint.load=auto")
    )
    assert "at step 10" in proc.stdout
    assert_close_curves(read_metrics(tmp_path / "split"), read_metrics(tmp_path / "whole"), rel=REL)


RESHARDS = {
    # name: (recipe, (procs, overrides) saving at step HALF, (procs, overrides) resuming to TINY_STEPS)
    "pp2-to-pp4": ("tiny_gpt", (2, ["parallel.pipeline=2"]), (4, ["parallel.pipeline=4"])),
    # dp_reshardable: each rank's flat optimizer shard as is; the data-parallel size may change
    "dp2-to-dp1-distopt-dp-reshardable": (
        "tiny_gpt",
        (2, ["parallel.distributed_optimizer=true", "checkpoint.optimizer_format=dp_reshardable"]),
        (1, ["parallel.distributed_optimizer=true", "checkpoint.optimizer_format=dp_reshardable"]),
    ),
    "pp2-vpp2-distopt-to-tp2-sp": (
        "tiny_gpt",
        (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.distributed_optimizer=true"]),
        (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.distributed_optimizer=true"]),
    ),
    "cp2-to-cp1": ("tiny_gpt", (2, ["parallel.context=2"]), (1, [])),
    # the context-parallel communication changes nothing that is saved: Ulysses inside pairs with the
    # ring across them, then Ulysses alone
    "cp4-a2a2-p2p2-to-cp2-a2a": (
        "tiny_gpt",
        (4, ["parallel.context=4", "parallel.context_comm=a2a+p2p", "parallel.context_a2a=2"]),
        (2, ["parallel.context=2", "parallel.context_comm=a2a"]),
    ),
    # Expert parameters get their own optimizer at every EP size (model/moe.py), so the chained
    # optimizer's checkpoint keys match between EP 2 and EP 1.
    "moe-ep2-to-ep1-distopt": (
        "tiny_moe",
        (2, ["parallel.expert=2", "parallel.distributed_optimizer=true"]),
        (1, ["parallel.distributed_optimizer=true"]),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESHARDS))
def test_resume_at_another_layout_continues_the_curve(name, request, synthetic_corpus, tmp_path):
    recipe, (n1, first), (n2, second) = RESHARDS[name]
    # tiny_gpt on masked data: unequal loss-token counts per micro-batch and rank on both sides
    masked = () if recipe == "tiny_moe" else MASKED
    expected = request.getfixturevalue("moe_reference" if recipe == "tiny_moe" else "masked_reference")
    run_pretrain(n1, recipe, tiny_overrides(synthetic_corpus, tmp_path, *masked, *first, f"train.steps={HALF}"))
    proc = run_pretrain(
        n2, recipe, tiny_overrides(synthetic_corpus, tmp_path, *masked, *second, "checkpoint.load=auto")
    )
    assert f"at step {HALF}" in proc.stdout
    assert_close_curves(read_metrics(tmp_path), expected, rel=REL)
    if recipe == "tiny_gpt":  # validation at step 5 by the first layout, at 10 by the second
        assert_close_validation(read_metrics(tmp_path), expected, rel=REL)


@pytest.mark.slow
def test_dropout_resume_is_exact(reference, synthetic_corpus, tmp_path):
    """Random streams are reseeded from (seed, step) each step (pretrain/step.py:seed_step), so
    dropout after a resume draws what the uninterrupted run drew: equal bit for bit. (And dropout
    is on: the curve is not the reference's without dropout.)"""
    extra = ["model.hidden_dropout=0.2", "model.attention_dropout=0.1"]
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path / "whole", *extra, "train.steps=4"))
    run_pretrain(1, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path / "split", *extra, "train.steps=2"))
    run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(synthetic_corpus, tmp_path / "split", *extra, "train.steps=4", "checkpoint.load=auto"),
    )
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [(r["loss"], r["grad_norm"]) for r in split] == [(r["loss"], r["grad_norm"]) for r in whole]
    without_dropout = reference[1][:4]
    # fp32 reorderings move a loss by ~1e-7 relative; dropout moves every step's by far more
    assert min(abs(w["loss"] - r["loss"]) / r["loss"] for w, r in zip(whole, without_dropout)) > 1e-5


# ----------------------------------------------------------------------------------- crash safety


@pytest.mark.slow
def test_sigkill_mid_save_leaves_previous_checkpoint_in_charge(reference, synthetic_corpus, tmp_path):
    """The trainer is killed (SIGKILL, from outside) after the step-4 shards are written but before
    the rename: step 2 stays the newest complete checkpoint, `auto` resumes from it, and the
    resumed run reproduces the reference curve."""
    _, expected = reference
    ckpt = tmp_path / "checkpoints"
    cmd = [
        sys.executable,
        "pretrain_gpt.py",
        "--recipe",
        "tiny_gpt",
        *tiny_overrides(
            synthetic_corpus,
            tmp_path,
            "train.steps=6",
            "checkpoint.interval=2",
            "debug.save_pause_at_step=4",
            "debug.save_pause_s=60",
        ),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Its own session, killed as a group (as a scheduler kills a job): the trainer and its helper
    # processes (the checkpoint writer's queue manager) die together.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "iter_0000004.tmp" / "metadata.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "never reached the step-4 save"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert [p.name for p in storage.complete_checkpoints(ckpt)] == ["iter_0000002"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert storage.resolve_load("auto", ckpt) == ckpt / "iter_0000002"
    out = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(synthetic_corpus, tmp_path, "train.steps=6", "checkpoint.interval=2", "checkpoint.load=auto"),
    )
    assert f"resumed from {ckpt / 'iter_0000002'} at step 2" in out.stdout
    assert_close_curves(read_metrics(tmp_path), expected[:6], rel=REL)
    assert not list(ckpt.glob("*.tmp"))  # the step-4 save was redone and renamed


def _fake_checkpoints(ckpt: pathlib.Path, steps, tmp_steps=()):
    for step in steps:
        (ckpt / storage.checkpoint_name(step)).mkdir(parents=True)
        (ckpt / storage.checkpoint_name(step) / "metadata.json").write_text("{}")
    for step in tmp_steps:
        (ckpt / (storage.checkpoint_name(step) + ".tmp")).mkdir(parents=True)


def test_keep_last_prunes_oldest_and_stale_partial_saves(tmp_path):
    _fake_checkpoints(tmp_path, [2, 4, 6, 8], tmp_steps=[3, 10])
    storage.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "iter_0000008", "iter_0000010.tmp"]
    storage.prune(tmp_path, keep_last=0)  # 0 still keeps the newest complete one
    assert [p.name for p in storage.complete_checkpoints(tmp_path)] == ["iter_0000008"]


def test_keep_last_in_training(synthetic_corpus, tmp_path):
    run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(synthetic_corpus, tmp_path, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=2"),
    )
    ckpt = tmp_path / "checkpoints"
    assert [p.name for p in storage.complete_checkpoints(ckpt)] == ["iter_0000004", "iter_0000006"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"


# ------------------------------------------------------------------------------ safe loading


class _Payload:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def saved_checkpoint(reference, tmp_path) -> pathlib.Path:
    log_dir, _ = reference
    copy = tmp_path / "ckpt" / "iter_0000010"
    shutil.copytree(log_dir / "checkpoints" / "iter_0000010", copy)
    return copy


def test_genuine_checkpoint_passes_the_safety_check(saved_checkpoint):
    storage.check_safe_to_load(saved_checkpoint)
    assert storage.read_extra(saved_checkpoint)["step"] == 10


@pytest.mark.parametrize("part", ["common.pt", ".metadata"])
def test_hostile_pickle_is_refused_without_running_it(part, saved_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    target = saved_checkpoint / part
    if part == "common.pt":
        torch.save({"extra": _Payload(marker)}, target)
    else:
        target.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError) as info:
        storage.check_safe_to_load(saved_checkpoint)
    assert str(info.value).startswith(
        f"checkpoint '{saved_checkpoint}': {part} holds objects a checkpoint may not contain, "
        f"refusing to unpickle it (it names {os.name}.system)"
    )
    assert not marker.exists()


def test_hostile_checkpoint_is_a_one_line_error(saved_checkpoint, synthetic_corpus, tmp_path):
    marker = tmp_path / "pwned"
    (saved_checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    overrides = tiny_overrides(synthetic_corpus, tmp_path / "run", f"checkpoint.load={saved_checkpoint}")
    proc = run_pretrain(1, "tiny_gpt", overrides, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint '{saved_checkpoint}': .metadata holds")
    assert not marker.exists()


@pytest.mark.slow
def test_async_save_snapshots_the_step_it_was_asked_for(reference, synthetic_corpus, tmp_path):
    """checkpoint.async_save: the step-2 shards are written in the background while steps 3-4 change
    the weights (the writer first sleeps 3 s, longer than steps 3 and 4 take); resuming from step 2
    (not the newest) still reproduces the reference curve."""
    _, expected = reference
    extra = ["checkpoint.async_save=true", "checkpoint.interval=2"]
    first = run_pretrain(
        2, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *extra, "train.steps=4", "debug.save_write_delay_s=3")
    )
    steps = read_metrics(tmp_path)
    assert sum(r["step_time_s"] for r in steps[2:4]) < 3.0  # steps 3, 4 ran while step 2 was being written
    assert "iter_0000002 (writing in the background)" in first.stdout
    ckpt = tmp_path / "checkpoints"
    assert [p.name for p in storage.complete_checkpoints(ckpt)] == ["iter_0000002", "iter_0000004"]
    # Each rank's background writer recorded its shards' sizes and CRC32s (pretrain/checkpoint/manifest.py); rank 0
    # merged them when it published, and the check before a load finds them intact.
    files = json.loads((ckpt / "iter_0000002" / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in (ckpt / "iter_0000002").iterdir()} - {"manifest.json"}
    assert set(files) == on_disk and {"__0_0.distcp", ".metadata", "common.pt", "metadata.json"} <= on_disk
    assert not list((ckpt / "iter_0000002").glob(".manifest.rank*"))
    assert manifest.problems(ckpt / "iter_0000002", verify=True) == []
    run_pretrain(
        2, "tiny_gpt", tiny_overrides(synthetic_corpus, tmp_path, *extra, f"checkpoint.load={ckpt / 'iter_0000002'}")
    )
    assert_close_curves(read_metrics(tmp_path), expected, rel=REL)
    assert (ckpt / "latest").read_text().strip() == f"iter_{TINY_STEPS:07d}"


def test_a_fresh_run_refuses_a_folder_that_holds_checkpoints(reference, synthetic_corpus, tmp_path):
    """Without checkpoint.load, writing into an earlier run's checkpoint folder is refused (one line,
    exit 2) and nothing there changes."""
    log_dir, _ = reference
    before = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    overrides = tiny_overrides(synthetic_corpus, tmp_path, f"checkpoint.dir={log_dir / 'checkpoints'}")
    proc = run_pretrain(1, "tiny_gpt", overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"error: checkpoint dir '{log_dir / 'checkpoints'}' already holds checkpoints (newest iter_0000010): "
        "resume with checkpoint.load=auto, or set another logging.dir / checkpoint.dir"
    ]
    assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == before


def test_latest_must_name_a_checkpoint(saved_checkpoint):
    """`latest` from elsewhere is never followed as a path."""
    (saved_checkpoint.parent / "latest").write_text("../../../etc\n")
    with pytest.raises(UserError, match=r"latest' names '\.\./\.\./\.\./etc', not a checkpoint like iter_0000100"):
        storage.resolve_load(str(saved_checkpoint.parent), saved_checkpoint.parent)
    (saved_checkpoint.parent / "latest").write_text("iter_0000010\n")
    assert storage.resolve_load(str(saved_checkpoint.parent), saved_checkpoint.parent) == saved_checkpoint
