"""Issue 36, the stages on several nodes: README's local two-node torchrun command (torchrun_nodes,
which the stages' two-node tests run), rank 0's bounded wait for a lost node, and 01's --shard flag.
The two-node runs, the lost node and the shards end to end: tests/test_{generate,weight,train,eval}.py."""
import importlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import common
from synvita import parts, render_rows, runs

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")  # the virtualenv's, as a user types it
# the same program where no torchrun script sits beside this interpreter
LAUNCHER = [TORCHRUN] if os.path.exists(TORCHRUN) else [sys.executable, "-m", "torch.distributed.run"]
# README's two-node flags ("On a cluster"; test_readme checks the line), {port} a free one here
NODE_FLAGS = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:{port}"]


def free_port():
    """A TCP port free on 127.0.0.1 now: each test's rendezvous its own, as tests run side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(*argv, env=None, timeout=300, host_first=False):
    """README's local two-node form, run as two nodes run it: `torchrun --nnodes 2 --nproc_per_node 1
    --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:<port> <script> <flags>` twice at once (a free port for
    29500), one process a node, gloo on the CPU. c10d numbers the nodes (by host, then process id: the
    first node gets rank 0; --node_rank is for the static rendezvous only). host_first: the second node
    starts once the first listens on the port, so that the first hosts the rendezvous, as the head node
    named by --rdzv_endpoint does on a cluster. Returns both nodes' CompletedProcess, the first's first."""
    port = free_port()
    cmd = [*LAUNCHER, *(flag.format(port=port) for flag in NODE_FLAGS), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]  # no pipe fills up
    nodes, end = [], time.monotonic() + timeout
    try:
        for out, err in logs:
            nodes.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True))
            while host_first and len(nodes) == 1 and nodes[0].poll() is None and time.monotonic() < end:
                try:  # the first node's rendezvous store takes connections: the second may start
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        codes = [node.wait(timeout=max(1, end - time.monotonic())) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # a hung node: the test fails, and leaves no process behind
                node.kill()
    done = []
    for code, (out, err) in zip(codes, logs):
        out.seek(0), err.seek(0)
        done.append(subprocess.CompletedProcess(cmd, code, out.read(), err.read()))
    return done


def assert_ran(nodes):
    """Both nodes ended with status 0; returns what the ranks printed (rank 0's lines: print0)."""
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    return "".join(node.stdout for node in nodes)


# ---- rank 0's wait for the other ranks' files: bounded by progress (item 2) ----
def test_a_wait_with_no_progress_stops_naming_the_files_and_the_flag(tmp_path):
    """A rank that died on another node is not seen by this node's torchrun: rank 0's wait stops once
    --dist_timeout seconds pass with no awaited file and no change to a watched part file."""
    start = time.monotonic()
    with pytest.raises(common.UserError, match=r"rank 0 waited 0.3 s \(--dist_timeout\) with no progress from the "
                                               r"other ranks for 1 file, e.g. .*finished.rank1.*relaunch the same command"):
        parts.wait_for_all([str(tmp_path / "finished.rank1")], 0.3, [str(tmp_path / "rank*.jsonl")])
    assert time.monotonic() - start < 5


def test_a_rank_that_still_writes_is_waited_for(tmp_path):
    """A slow rank is not a lost one: each record it appends restarts the clock, however long it takes."""
    marker, part = tmp_path / "finished.rank1", tmp_path / "rank1.jsonl"

    def slow_rank():  # a record every 0.1 s for 0.6 s, twice the timeout, then its marker
        for i in range(6):
            time.sleep(0.1)
            with open(part, "a") as fh:
                fh.write(f"[{i}]\n")
        parts.finish(str(marker), ["bad.mp4"])
    worker = threading.Thread(target=slow_rank)
    worker.start()
    assert parts.wait_for_all([str(marker)], 0.25, [str(tmp_path / "rank*.jsonl")]) == [["bad.mp4"]]
    worker.join()


def test_the_timeout_reaches_the_process_and_its_waits():
    """--dist_timeout is torch.distributed's timeout under torchrun (init_process_group; every stage's
    --help names it: tests/test_cli.py) and the bound of rank 0's waits (Dist.timeout)."""
    assert runs.setup_distributed(timeout=5).timeout == 5  # plain python: no process group, the value kept
    assert importlib.import_module("01_generate").Args().dist_timeout == runs.DIST_TIMEOUT == runs.Dist().timeout


# ---- 01's --shard i/n (item 3; the shards end to end: tests/test_generate.py) ----
@pytest.mark.parametrize("shard", ["3/3", "1", "-1/3", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_is_refused_before_any_work(shard, tmp_path):
    gen = importlib.import_module("01_generate")
    args = gen.Args(input_csv=str(tmp_path / "none.csv"), out_dir=str(tmp_path / "out"), shard=shard)
    with pytest.raises(common.UserError, match=rf"--shard {re.escape(repr(shard))}: give i/n with 0 <= i < n"):
        gen.main(args)  # before the CSV is read: it does not exist
    assert not (tmp_path / "out").exists()


def test_a_shard_is_one_process_and_deals_calls_as_ranks_do():
    gen = importlib.import_module("01_generate")
    with pytest.raises(common.UserError, match="a shard is one process; run it with python, not torchrun"):
        render_rows.this_share(gen.Args(shard="0/2"), runs.Dist(world_size=2))
    share = render_rows.this_share(gen.Args(shard="1/3"), runs.Dist())
    assert runs.shard(list(range(7)), share) == [1, 4] and not share.master  # the CSV is the merge's
