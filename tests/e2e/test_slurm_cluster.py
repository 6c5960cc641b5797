"""scripts/slurm/pretrain.sbatch under a real Slurm (tests/helpers/slurm.py: controller and two
slurmd on this machine): two nodes, one gloo worker each, reproduce the single-process losses; Slurm's
own SIGUSR1 to the batch shell makes the job checkpoint, exit 75, requeue itself and resume the same
curve; SIGTERM to the job's processes checkpoints and exits 75 without a requeue; a bad recipe fails
at once with one `error:` line. Also, without Slurm: SIGTERM to `python -m pretrain.launch` exits 75."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from pretrain.guards import EXIT_PREEMPTED
from tests.helpers.runs import REPO, assert_close_curves, read_metrics, tiny_overrides
from tests.helpers.slurm import SlurmCluster
from tests.helpers.spawn import free_port

JOB_TIMEOUT_S = 240
STOP_AT_STEP = 4  # the signal is sent once the step before is logged; this one stalls STALL_S first
STALL_S = 5  # the signal reaches the workers well within it, also on a busy machine


class Job:
    """One `sbatch scripts/slurm/pretrain.sbatch tiny_gpt ...`, submitted from a folder that looks
    like the repository root (links to its entries), so logs/slurm/ lands there, not in the repo."""

    def __init__(self, cluster: SlurmCluster, tmp_path: pathlib.Path, corpus: str, *extra: str):
        self.cluster, self.run_dir, self.submit = cluster, tmp_path / "run", tmp_path / "submit"
        self.submit.mkdir()
        for entry in REPO.iterdir():
            if entry.name not in ("logs", "runs", ".git"):
                (self.submit / entry.name).symlink_to(entry)
        (self.submit / "logs" / "slurm").mkdir(parents=True)  # docs/slurm.md: Slurm does not create it
        env = {k: v for k, v in cluster.env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHON=sys.executable, RDZV_PORT=str(free_port()))
        # No GRES on the test cluster: --gpus-per-node=0 replaces the script's --gpus-per-node=8 and
        # launch.sh starts one process per node.
        proc = cluster.run(
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--gpus-per-node=0",
            "scripts/slurm/pretrain.sbatch",
            "tiny_gpt",
            *tiny_overrides(corpus, self.run_dir, *extra),
            cwd=self.submit,
            env=env,
        )
        assert proc.returncode == 0, f"sbatch: {proc.stderr.strip()}\n{cluster.daemon_logs()}"
        self.id = proc.stdout.strip().split(";")[0]

    @property
    def out(self) -> pathlib.Path:
        return self.submit / "logs" / "slurm" / f"pretrain-{self.id}.out"

    def node_logs(self) -> list:
        return sorted((self.submit / "logs" / "slurm").glob(f"pretrain-{self.id}-node*.log"))

    def explain(self) -> str:
        """scontrol's view of the job and the ends of its logs, for a failure message."""
        parts = [self.cluster.run("scontrol", "show", "job", self.id).stdout]
        for path in [self.out, *self.node_logs()]:
            text = path.read_text(errors="replace") if path.exists() else "(missing)"
            parts.append(f"--- {path.name}\n{text[-4000:]}")
        return "\n".join(parts)

    def wait_until_done(self) -> dict:
        return self.cluster.wait_until_done(self.id, JOB_TIMEOUT_S, self.explain)

    def wait_for_step(self, step: int) -> None:
        """Until metrics.jsonl has `step` (the job is still running then)."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        metrics = self.run_dir / "metrics.jsonl"
        while not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
            state = self.cluster.job(self.id).get("JobState")
            assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, (
                f"job {self.id} is {state} and has not logged step {step}\n{self.explain()}"
            )
            time.sleep(0.2)

    def signal(self, *scancel_args: str) -> None:
        proc = self.cluster.run("scancel", *scancel_args, self.id)
        assert proc.returncode == 0, f"scancel {' '.join(scancel_args)}: {proc.stderr.strip()}"

    def logs_text(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.node_logs())


def _assert_ended(job: Job, state: str, exit_code: int, restarts: int) -> None:
    info = job.wait_until_done()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == (state, f"{exit_code}:0", str(restarts)), (
        job.explain()
    )


def _stopped_step(job: Job) -> int:
    """The step the job's workers stopped after, from rank 0's one line; checks they saved it."""
    match = re.search(
        r"^stopped: preemption signal: stopped after step (\d+), saved (\S+); "
        r"resume with checkpoint.load=auto \(exit code 75\)$",
        job.logs_text(),
        re.M,
    )
    assert match, job.explain()
    step = int(match.group(1))
    assert match.group(2) == str(job.run_dir / "checkpoints" / f"iter_{step:07d}"), job.explain()
    # The signal lands during the stall of STOP_AT_STEP unless this machine is very slow.
    assert STOP_AT_STEP <= step < 10, job.explain()
    return step


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_log_where_the_docs_say(
    slurm_cluster, reference, synthetic_corpus, tmp_path
):
    job = Job(slurm_cluster, tmp_path, synthetic_corpus)
    _assert_ended(job, "COMPLETED", 0, restarts=0)
    # The batch shell's one line in <job name>-<job id>.out, the nodes' output in the node logs.
    out = job.out.read_text().splitlines()
    assert len(out) == 1 and out[0].startswith(
        f"pretrain.sbatch: job {job.id} (restart 0) on 127.0.0.[1-2]: tiny_gpt "
    ), job.explain()
    assert [p.name for p in job.node_logs()] == [f"pretrain-{job.id}-node0.log", f"pretrain-{job.id}-node1.log"]
    layout = "layout: world 2 = tensor 1 x pipeline 1 x context 1 x data 2; expert 1; 2 micro-batches/step"
    assert [layout in path.read_text() for path in job.node_logs()].count(True) == 1, job.explain()  # rank 0's node
    assert_close_curves(read_metrics(job.run_dir), reference[1], rel=1e-5)


@pytest.mark.slow
def test_usr1_from_slurm_checkpoints_requeues_and_resumes_the_same_curve(
    slurm_cluster, reference, synthetic_corpus, tmp_path
):
    """`scancel --signal=USR1 --batch` is what `#SBATCH --signal=B:USR1@300` sends at the time limit:
    the batch shell alone gets it, and the rest of the path is the script's and srun's."""
    job = Job(
        slurm_cluster, tmp_path, synthetic_corpus, f"debug.stall_at_step={STOP_AT_STEP}", f"debug.stall_s={STALL_S}"
    )
    job.wait_for_step(STOP_AT_STEP - 1)
    job.signal("--signal=USR1", "--batch")
    _assert_ended(job, "COMPLETED", 0, restarts=1)
    out = job.out.read_text()
    for line in [
        f"pretrain.sbatch: checkpoint saved; requeueing job {job.id}",
        f"pretrain.sbatch: job {job.id} (restart 1) on 127.0.0.[1-2]",
    ]:
        assert line in out, job.explain()
    step = _stopped_step(job)
    assert f"resumed from {job.run_dir}/checkpoints/iter_{step:07d} at step {step}" in job.logs_text(), job.explain()
    assert_close_curves(read_metrics(job.run_dir), reference[1], rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_the_job_step_checkpoints_and_exits_75_without_requeue(slurm_cluster, synthetic_corpus, tmp_path):
    """`scancel --signal=TERM` signals every process of the job step (launchers and workers) but not
    the batch shell, which therefore does not requeue: the job ends with the workers' 75."""
    job = Job(
        slurm_cluster, tmp_path, synthetic_corpus, f"debug.stall_at_step={STOP_AT_STEP}", f"debug.stall_s={STALL_S}"
    )
    job.wait_for_step(STOP_AT_STEP - 1)
    job.signal("--signal=TERM")
    _assert_ended(job, "FAILED", EXIT_PREEMPTED, restarts=0)
    assert "requeue" not in job.out.read_text(), job.explain()
    _stopped_step(job)
    assert "Traceback" not in job.logs_text(), job.explain()


@pytest.mark.slow
def test_bad_recipe_fails_with_one_error_line_and_no_requeue(slurm_cluster, synthetic_corpus, tmp_path):
    job = Job(slurm_cluster, tmp_path, synthetic_corpus, "train.stepz=5")
    _assert_ended(job, "FAILED", 2, restarts=0)
    lines = job.out.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"pretrain.sbatch: job {job.id} (restart 0)"), job.explain()
    assert re.fullmatch(r"error: .*train\.stepz.*train\.steps.*", lines[1]), job.explain()
    assert job.node_logs() == [], job.explain()  # no node started


WORKER = """\
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
print("ready", flush=True)
time.sleep(120)
"""


def test_launcher_exits_75_on_sigterm(tmp_path):
    """torch's launcher handles the signals of its --signals-to-handle option, SIGTERM by default,
    over ours: `python -m pretrain.launch` exited 1 with a traceback on SIGTERM, whatever its workers did."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pretrain.launch", "--standalone", "--nproc_per_node=1", str(worker)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout.readline() == "ready\n", launcher.communicate(timeout=60)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "SignalException" not in err, err[-3000:]
