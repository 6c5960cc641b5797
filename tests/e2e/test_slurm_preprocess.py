"""scripts/slurm/preprocess.sbatch under a real Slurm (tests/helpers/slurm.py: a controller and two
slurmd on this machine): the first job submits a 2-task array of `data.preprocess text` shards and a
merge job that waits for it; the merged .bin/.idx equal one run of the same command in this process."""

import re
import sys

import pytest

from data.preprocess import main
from tests.helpers.corpora import TEXTS, file_bytes, write_gzip, write_jsonl
from tests.helpers.runs import REPO
from tests.helpers.slurm import SlurmCluster

JOB_TIMEOUT_S = 240


@pytest.mark.slow
def test_array_job_shards_then_merge_job_equal_one_run(slurm_cluster: SlurmCluster, bpe_path, tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:100])
    write_jsonl(tmp_path / "b.jsonl", TEXTS[100:])
    write_gzip(tmp_path / "b.jsonl.gz", tmp_path / "b.jsonl")
    options = ["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"), "--tokenizer", bpe_path]
    options += ["--part-bytes", "2000", "--no-progress"]
    assert main(["text", *options, "--output-prefix", str(tmp_path / "whole")]) == 0
    submit = tmp_path / "submit"  # looks like the repository root; logs/slurm/ lands here
    submit.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("logs", "runs", ".git"):
            (submit / entry.name).symlink_to(entry)
    (submit / "logs" / "slurm").mkdir(parents=True)
    out = tmp_path / "out" / "corpus"
    env = dict(slurm_cluster.env, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = slurm_cluster.run(
        "sbatch", "--parsable", "scripts/slurm/preprocess.sbatch", "2", str(out), *options, cwd=submit, env=env
    )
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\n{slurm_cluster.daemon_logs()}"
    first = proc.stdout.strip().split(";")[0]
    logs = submit / "logs" / "slurm"

    def explain() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))

    assert slurm_cluster.wait_until_done(first, JOB_TIMEOUT_S, explain)["JobState"] == "COMPLETED", explain()
    line = (logs / f"preprocess-{first}.out").read_text()
    match = re.fullmatch(
        rf"preprocess\.sbatch: array job (\d+) \(2 shards\), then merge job (\d+) into {out}\.bin/\.idx\n", line
    )
    assert match, explain()
    array, merge = match.groups()
    merged = slurm_cluster.wait_until_done(merge, JOB_TIMEOUT_S, explain)
    assert (merged["JobState"], merged["ExitCode"]) == ("COMPLETED", "0:0"), explain()
    for index in range(2):
        task = (logs / f"preprocess-{array}_{index}.out").read_text()
        assert f"wrote {out}-{index:05d}-of-00002.bin/.idx: " in task, explain()
    assert f"wrote {out}.bin/.idx from 2 inputs: " in (logs / f"preprocess-merge-{merge}.out").read_text()
    assert file_bytes(str(out)) == file_bytes(str(tmp_path / "whole"))
    capsys.readouterr()
