"""Two "nodes" on one machine: network namespaces joined by a veth pair, one launcher (torchrun) per
namespace with c10d rendezvous over that link, tensor parallel inside a node and data parallel
across the link. The losses match the single-process run."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO, assert_close_curves, read_metrics, tiny_overrides

TIMEOUT_S = 400
PORT = 29417


def _ip(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class TwoNodes:
    """Namespaces <tag>a, <tag>b with veth ends <tag>a / <tag>b at 10.X.Y.1 and .2 (/24)."""

    def __init__(self, tag: str, subnet: str):
        self.names = (f"{tag}a", f"{tag}b")
        self.addrs = (f"{subnet}.1", f"{subnet}.2")

    def create(self) -> None:
        a, b = self.names
        steps = [
            ("netns", "add", a),
            ("netns", "add", b),
            ("link", "add", a, "type", "veth", "peer", "name", b),
            ("link", "set", a, "netns", a),
            ("link", "set", b, "netns", b),
        ]
        for ns, addr in zip(self.names, self.addrs):
            steps += [
                ("-n", ns, "addr", "add", f"{addr}/24", "dev", ns),
                ("-n", ns, "link", "set", ns, "up"),
                ("-n", ns, "link", "set", "lo", "up"),
            ]
        for step in steps:
            proc = _ip(*step)
            if proc.returncode != 0:
                raise OSError(f"ip {' '.join(step)}: {proc.stderr.strip()}")

    def remove(self) -> None:
        for ns in self.names:  # deleting a namespace deletes its veth end, and with it the pair
            _ip("netns", "del", ns)


@pytest.fixture
def two_nodes():
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (euid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    tag = f"pt{os.getpid() % 100000}"
    nodes = TwoNodes(tag, f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}")
    try:
        nodes.create()
    except OSError as exc:
        nodes.remove()
        pytest.skip(f"cannot create network namespaces here: {exc}")
    yield nodes
    nodes.remove()


def _node(nodes: TwoNodes, index: int, overrides) -> subprocess.Popen:
    ns, addr, head = nodes.names[index], nodes.addrs[index], nodes.addrs[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", GLOO_SOCKET_IFNAME=ns)
    cmd = [
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-m",
        "pretrain.launch",
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={head}:{PORT}",
        "--rdzv_id=two-nodes",
        f"--rdzv_conf=is_host={'true' if index == 0 else 'false'}",
        f"--local_addr={addr}",
        "--max_restarts=0",
        "pretrain_gpt.py",
        "--recipe",
        "tiny_gpt",
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_namespaces_tp2_per_node_dp_across_match_single_process(two_nodes, reference, synthetic_corpus, tmp_path):
    overrides = tiny_overrides(synthetic_corpus, tmp_path, "parallel.tensor=2")
    procs = [_node(two_nodes, i, overrides) for i in range(2)]
    results = []
    for proc in procs:
        try:
            results.append(proc.communicate(timeout=TIMEOUT_S))
        finally:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
    layout = "layout: world 4 = tensor 2 x pipeline 1 x context 1 x data 2; expert 1; 2 micro-batches/step"
    assert sum(layout in out for out, _ in results) == 1  # printed by global rank 0, on one of the nodes
    assert_close_curves(read_metrics(tmp_path), reference[1], rel=1e-5)
