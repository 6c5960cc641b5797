"""Without Slurm: SIGTERM to `python -m pretrain.launch` exits 75, as docs/slurm.md says."""

import os
import signal
import subprocess
import sys

from pretrain.guards import EXIT_PREEMPTED
from tests.distributed import REPO

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
    launcher = subprocess.Popen([sys.executable, "-m", "pretrain.launch", "--standalone", "--nproc_per_node=1",
                                 str(worker)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        assert launcher.stdout.readline() == "ready\n", launcher.communicate(timeout=60)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "SignalException" not in err, err[-3000:]
