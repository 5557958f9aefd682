"""Faults in a multi-node job under torchrun's elastic agent: two agents ("nodes") on 127.0.0.1,
2 ranks each x 2 DataLoader workers, reading a directory or an s3:// prefix (moto on 127.0.0.1)
while a writer adds, replaces and deletes shards (tools/multinode.py runs and checks the job).

Each test kills or starves something mid-job and then checks, counted from the checkpoints the
restarts resumed from: every sample of each epoch's snapshot yielded exactly once (at most
``world_size - 1`` per world left out), equal per rank within each world, one snapshot per epoch
across restarts, and that the log says what happened. Sources alternate: directory, s3, ...
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest

from conftest import wait_for
from s3fixtures import fault_proxy, moto_server, s3  # noqa: F401 - fixtures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import multinode  # noqa: E402

pytestmark = [pytest.mark.xdist_group("torchrun"), pytest.mark.timeout(150)]
JOB_SECONDS = 120  # a job that has not ended by then hangs: its agents are killed and the test fails


@pytest.fixture
def nodes():
    """The agents a test starts (and its writer); at teardown each agent is killed with its whole
    tree (ranks, workers), and the writer stopped."""
    started = []
    yield started
    for p in started:
        if isinstance(p, multinode.Writer):
            p.close()
        else:
            multinode.kill_node(p)


def _job(tmp_path, source, agents, client=None, before_change=None, **launch):
    run = str(tmp_path / "run")
    for node in range(2):
        os.makedirs(os.path.join(run, f"node{node}"))
    if client is None:
        os.makedirs(source)
    writer = multinode.Writer(run, source, client, before_change=before_change)
    writer.seed()
    agents.append(writer.start())
    job = multinode.launch(run, source, procs=agents, **launch)
    return job, writer


def _finish(job, writer, nodes=(0, 1)):
    try:
        codes = multinode.wait(job, JOB_SECONDS, nodes)
    finally:
        writer.close()
    logs = "\n".join(job.agent_log(n)[-3000:] for n in nodes)
    assert [codes[n] for n in nodes] == [0] * len(nodes), f"agents exited with {codes}:\n{logs}"
    report = multinode.check(job.run)
    assert set(report) == {0, 1, 2}, f"epochs read: {sorted(report)}"
    return report


def _restart_figures(run: str, fault_time: float) -> float:
    """Seconds from the fault to the first sample a generation started after it yielded."""
    first = min(e["t"] for g in multinode.generations(run).values() for lines in g.logs.values()
                for e in lines if "key" in e and e["t"] > fault_time
                and next(s for s in lines if s.get("event") == "start")["t"] > fault_time)
    return first - fault_time


def _resumes(run: str) -> list[tuple[int, dict]]:
    """(world size, checkpoint) of each generation that resumed, in order."""
    return [(start["world_size"], start["parent"]) for start in multinode.events(run, "start")
            if start["parent"] is not None and start["rank"] == 0]


def test_rank_killed_mid_epoch_agents_restart_all_and_resume_exactly_once(tmp_path, nodes):
    job, writer = _job(tmp_path, str(tmp_path / "shards"), nodes)
    wait_for(lambda: multinode.mid_epoch_checkpoint(job.run) is not None, 90, "a checkpoint inside epoch 1")
    victim = next(e for e in multinode.events(job.run, "start") if e["rank"] == 3)  # on node 1
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()
    writer.put("s900.tar", 30)  # while the job is down: the resumed epoch still reads its saved snapshot
    report = _finish(job, writer)

    (world, checkpoint), = _resumes(job.run)
    assert world == 4 and checkpoint["world_size"] == 4
    host = job.agent_log(int(victim["node"][-1]))
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {victim['pid']})" in host  # the agent saw the kill
    assert "resuming epoch" in job.agent_log(0) and checkpoint["dir"] in job.agent_log(0)
    assert report[checkpoint["epoch"]]["worlds"] == [4, 4]  # the interrupted epoch: before and after
    print(f"\nrank killed: first sample after the restart {_restart_figures(job.run, killed_at):.1f}s after the kill")
    print(multinode.describe(report))


def test_dataloader_worker_killed_error_names_it_then_resume(tmp_path, nodes, s3):
    job, writer = _job(tmp_path, s3.url("shards/"), nodes, client=s3.client)
    wait_for(lambda: multinode.mid_epoch_checkpoint(job.run) is not None, 90, "a checkpoint inside epoch 1")
    start = next(e for e in multinode.events(job.run, "start") if e["rank"] == 0)
    pid_file = os.path.join(job.run, "pids", start["generation"], "0-w1")
    pid = int(open(pid_file).read())
    killed_at = time.time()  # before the kill: rank 0 may log its error before this process runs again
    os.kill(pid, signal.SIGKILL)
    report = _finish(job, writer)

    errors = [e["error"] for e in multinode.events(job.run, "error") if e["t"] > killed_at]
    # torch says one of two things, by where its main process was when the worker died
    named = re.compile(rf"DataLoader worker \(pid {pid}\) is killed by signal|"
                       rf"DataLoader worker \(pid\(s\) {pid}\) exited unexpectedly")
    assert any(named.search(e) for e in errors), errors
    (world, checkpoint), = _resumes(job.run)
    assert world == 4 and report[checkpoint["epoch"]]["worlds"] == [4, 4]
    print(f"\nworker killed: first sample after the restart {_restart_figures(job.run, killed_at):.1f}s after the kill")
    print(multinode.describe(report))


def test_node_without_the_store_lost_job_goes_on_with_world_size_2(tmp_path, nodes):
    job, writer = _job(tmp_path, str(tmp_path / "shards"), nodes, nnodes="1:2")
    wait_for(lambda: multinode.mid_epoch_checkpoint(job.run, world_size=4) is not None, 90,
             "a checkpoint inside epoch 1 with both nodes")
    multinode.kill_node(job.agents[1])  # node 0 hosts the c10d store
    killed_at = time.time()
    report = _finish(job, writer, nodes=(0,))

    world, checkpoint = _resumes(job.run)[-1]
    assert (world, checkpoint["world_size"]) == (2, 4), _resumes(job.run)
    assert f"world size 2, resuming epoch {checkpoint['epoch']} from checkpoint {checkpoint['dir']} " \
           f"(world size 4 before)" in job.agent_log(0)
    epoch = checkpoint["epoch"]
    assert report[epoch]["worlds"][-2:] == [4, 2]
    # the library says it too, in the main process of each rank of the smaller world
    for rank in (0, 1):
        assert f"epoch {epoch}: resuming snapshot {report[epoch]['snapshot']} saved by world size 4 x 2 workers, " \
               f"now rank {rank} of world size 2" in job.agent_log(0)
    assert report[2]["worlds"] == [2]
    print(f"\nnode lost: first sample after the restart {_restart_figures(job.run, killed_at):.1f}s after the kill")
    print(multinode.describe(report))


def test_s3_unavailable_at_epoch_boundary_retried_then_every_rank_raises_and_restart_resumes(
        tmp_path, nodes, s3, fault_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)  # the ranks read through the proxy; the writer not
    prefix = s3.url("shards/")
    faults = {}

    def before_change(epoch):
        if epoch == 1:  # one 503 to the listing: within the retry budget (3 attempts)
            faults[1] = fault_proxy.inject("status", times=1, status=503, path="list-type=2")
        if epoch == 2 and 2 not in faults:  # 503 to every listing, until the ranks gave up
            faults[2] = fault_proxy.inject("status", times=10**6, status=503, path="list-type=2")
            faults["t"] = time.time()

    job, writer = _job(tmp_path, prefix, nodes, client=s3.client, before_change=before_change)
    wait_for(lambda: len(multinode.events(job.run, "error")) == 4, 90, "every rank's set_epoch(2) to raise")
    fault_proxy.clear()
    report = _finish(job, writer)

    assert faults[1].injected == 1
    errors = multinode.events(job.run, "error")
    assert all(prefix in e["error"] for e in errors), errors
    assert sum(e["error"].startswith("RankZeroError") for e in errors) == 3
    (world, checkpoint), = _resumes(job.run)  # the 503 at epoch 1 never restarted anything
    assert checkpoint["epoch"] == 2 and checkpoint["dir"].endswith("-end") and world == 4
    assert report[1]["worlds"] == [4] and report[2]["worlds"] == [4]
    print(f"\n503 past the budget: first sample after the restart "
          f"{_restart_figures(job.run, faults['t']):.1f}s after the first 503")
    print(multinode.describe(report))
