"""A multi-node job on one machine: two torchrun agents ("nodes") on 127.0.0.1, 2 ranks each,
2 DataLoader workers per rank, reading a directory or an ``s3://`` prefix while a writer adds,
replaces and deletes shards between epochs; checked for exactly once, equal per rank, across
restarts and a lost node.

The recipe (what ``launch`` runs, once per node, both at once; node 0 hosts the c10d store, and
every other node adds ``,is_host=false`` to ``--rdzv_conf``: on one machine each agent would
otherwise take the endpoint for its own)::

    TMPDIR=node0/tmp XDG_CACHE_HOME=node0/cache \\
    torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT \\
        --rdzv_id=job --rdzv_conf=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=2 \\
        --max_restarts=3 tools/multinode.py train SOURCE --job-dir RUN --node-name node0 --state-dir node0/state \\
        --cache-dir node0/objects

Each node keeps its own temporary directory, index cache (``$XDG_CACHE_HOME/wdsrefresh``),
``state_dir`` and object cache (``RUN/nodeN/objects``, ``cache_dir`` of the s3 source); the run
directory ``RUN`` (checkpoints, logs, the writer's hand-shake) is what both nodes see, as a
shared file system would be. ``--nnodes=1:2`` lets the job go on with the node that hosts the
store when the other one is lost.

The training loop (``train``, one per rank): each rank saves its StatefulDataLoader state every
``--every`` batches into ``RUN/ckpt/<generation>-<step>/rank<r>.pt``; after a barrier rank 0
points ``RUN/ckpt/latest.json`` at it, so ``latest`` always names a checkpoint every rank
finished. A restarted rank loads ``latest``: the same world size loads its own rank's state into
the loader, another world size loads every rank's state into the dataset (the elastic resume).
Every consumed sample is a line of ``RUN/logs/<generation>-r<rank>.jsonl``, and so are the
events (start, epoch, error, done); a checkpoint records how many sample lines its rank had
written, so ``check`` can tell what each checkpoint covers.

    python tools/multinode.py demo                 # a directory, 3 epochs, no fault
    python tools/multinode.py demo --s3            # an s3:// prefix on a loopback moto server
    python tools/multinode.py demo --kill-rank     # SIGKILL a rank mid-epoch, show the restart
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from ddp_check import free_port  # noqa: E402
from shardutil import make_samples, tar_bytes, write_shard  # noqa: E402

RDZV_CONF = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=2"
log = logging.getLogger("multinode")


# --------------------------------------------------------------------------- the training loop (per rank)


def _save(path: str, obj, binary: bool) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if binary else "w") as f:
        if binary:
            import torch

            torch.save(obj, f)
        else:
            json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


class RankLog:
    """One rank's log of one generation: a JSON line per consumed sample or event."""

    def __init__(self, run: str, generation: str, rank: int):
        os.makedirs(os.path.join(run, "logs"), exist_ok=True)
        self.name = f"{generation}-r{rank}.jsonl"
        self.file = open(os.path.join(run, "logs", self.name), "a")
        self.samples = 0

    def event(self, kind: str, **fields) -> None:
        self.file.write(json.dumps({"event": kind, "t": time.time(), **fields}) + "\n")
        self.file.flush()

    def batch(self, epoch: int, batch: list[dict]) -> None:
        for s in batch:
            self.file.write(json.dumps({"epoch": epoch, "key": s["__key__"], "pad": bool(s.get("__padded__")),
                                        "t": time.time()}) + "\n")
        self.file.flush()
        self.samples += len(batch)


def _record_worker_pid(worker_id: int) -> None:
    """Each DataLoader worker names its pid, so a test can kill one."""
    logging.getLogger("wdsrefresh").setLevel(logging.ERROR)
    directory = os.environ["MULTINODE_PIDS"]
    with open(os.path.join(directory, f"{os.environ['RANK']}-w{worker_id}"), "w") as f:
        f.write(str(os.getpid()))


def _make_source(source: str, cache_dir: str, attempts: int):
    import wdsrefresh as wr

    if not source.startswith("s3://"):
        return source
    return wr.ObjectSource(source, storage_options={"cache_dir": cache_dir, "cache_limit": "64MiB",
                                                    "attempts": attempts, "backoff": 0.2, "max_backoff": 1.0})


def _wait_for_writer(run: str, epoch: int, timeout: float = 30.0) -> None:
    """Rank 0, before resolving ``epoch``: asks the writer to change the shards, waits until it did."""
    hand = os.path.join(run, "writer")
    if not os.path.isdir(hand):
        return
    open(os.path.join(hand, f"want-{epoch}"), "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(hand, f"done-{epoch}")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the writer did not change the shards for epoch {epoch} within {timeout}s")
        time.sleep(0.02)


def train(args) -> int:
    """One rank of the job; see the module docstring."""
    from datetime import timedelta

    import torch.distributed as dist
    from torchdata.stateful_dataloader import StatefulDataLoader

    import wdsrefresh as wr

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.node} rank{os.environ['RANK']} %(message)s")
    logging.getLogger("wdsrefresh").setLevel(logging.INFO)  # snapshots, resumes; the workers log errors only
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one generation id for the ranks started together
    generation = box[0]
    ckpt_root = os.path.join(args.run, "ckpt")
    os.makedirs(ckpt_root, exist_ok=True)
    pids = os.path.join(args.run, "pids", generation)
    os.makedirs(pids, exist_ok=True)
    os.environ["MULTINODE_PIDS"] = pids
    rlog = RankLog(args.run, generation, rank)
    latest = os.path.join(ckpt_root, "latest.json")
    parent = _read_json(latest) if os.path.exists(latest) else None
    dist.barrier()  # every rank read the same latest.json before rank 0 can move it

    ds = wr.RefreshingWebDataset(_make_source(args.source, args.cache_dir, args.attempts), seed=1,
                                 state_dir=args.state_dir)
    start_epoch = 0
    own_state = None
    if parent is not None:
        states = [wr_load(os.path.join(ckpt_root, parent["dir"], f"rank{r}.pt")) for r in range(parent["world_size"])]
        start_epoch = parent["epoch"]
        if states[0]["loader"] is not None:
            if parent["world_size"] == world:
                own_state = states[rank]["loader"]
            else:  # another world size: every rank's state, redistributed by the dataset
                ds.load_state_dict([s["loader"] for s in states])
    loader = StatefulDataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, collate_fn=list,
                                worker_init_fn=_record_worker_pid)
    if own_state is not None:
        loader.load_state_dict(own_state)
    rlog.event("start", node=args.node, rank=rank, world_size=world, pid=os.getpid(), parent=parent,
               generation=generation)
    if parent is None:
        log.info("generation %s: world size %d, starting at epoch 0", generation, world)
    else:
        log.info("generation %s: world size %d, resuming epoch %d from checkpoint %s (world size %d before)",
                 generation, world, start_epoch, parent["dir"], parent["world_size"])
    step = 0
    try:
        for epoch in range(start_epoch, args.epochs):
            resumed = parent is not None and epoch == start_epoch and states[0]["loader"] is not None
            if rank == 0 and not resumed:
                _wait_for_writer(args.run, epoch)
            snap = ds.set_epoch(epoch)
            rlog.event("epoch", epoch=epoch, snapshot=snap.id, world_size=world, resumed=resumed,
                       shards=[[os.path.basename(s.url), s.nsamples] for s in snap.shards])
            log.info("epoch %d: snapshot %s (%d shards, %d samples), world size %d%s", epoch, snap.id,
                     len(snap.shards), sum(s.nsamples for s in snap.shards), world, ", resumed" if resumed else "")
            for batch in loader:
                rlog.batch(epoch, batch)
                step += 1
                if args.step_seconds:
                    time.sleep(args.step_seconds)  # the model's step
                if step % args.every == 0:
                    _checkpoint(ckpt_root, generation, step, rank, world, epoch, loader.state_dict(), rlog)
            read = ds.snapshot(epoch)  # what the workers read: after loader.load_state_dict, the saved
            # snapshot, which set_epoch (called before the workers loaded their states) did not return
            rlog.event("read", epoch=epoch, snapshot=read.id,
                       shards=[[os.path.basename(s.url), s.nsamples] for s in read.shards])
            _checkpoint(ckpt_root, generation, step, rank, world, epoch + 1, None, rlog, suffix="-end")
    except BaseException as exn:
        rlog.event("error", error=f"{type(exn).__name__}: {exn}")
        log.error("generation %s: %s: %s", generation, type(exn).__name__, exn)
        raise
    finally:
        ds.close()
    rlog.event("done")
    dist.destroy_process_group()
    return 0


def wr_load(path: str) -> dict:
    import torch

    return torch.load(path, weights_only=False)


def _checkpoint(root: str, generation: str, step: int, rank: int, world: int, epoch: int, state, rlog: RankLog,
                suffix: str = "") -> None:
    """Every rank saves its state; once all have (a barrier), rank 0 makes it the latest."""
    import torch.distributed as dist

    name = f"{generation}-{step:06d}{suffix}"
    directory = os.path.join(root, name)
    os.makedirs(directory, exist_ok=True)
    _save(os.path.join(directory, f"rank{rank}.pt"),
          {"loader": state, "epoch": epoch, "log": rlog.name, "samples": rlog.samples}, binary=True)
    dist.barrier()
    if rank == 0:
        _save(os.path.join(root, "latest.json"), {"dir": name, "world_size": world, "epoch": epoch,
                                                    "generation": generation}, binary=False)
        rlog.event("checkpoint", dir=name, epoch=epoch)


# --------------------------------------------------------------------------- the writer


class Writer:
    """Adds one shard, replaces one (other count, same name) and deletes one before each epoch
    after the first, when rank 0 asks (``RUN/writer/want-<epoch>``); answers ``done-<epoch>``.

    Changes land between snapshots, so every epoch's snapshot stays whole and ``check`` can count
    exactly; what a change mid-epoch does (skip and pad) is tools/ddp_check.py's subject.
    """

    def __init__(self, run: str, source: str, client=None, seed: int = 0, before_change=None):
        self.before_change = before_change  # called with each epoch asked for, before the change
        self.hand = os.path.join(run, "writer")
        os.makedirs(self.hand, exist_ok=True)
        self.source, self.client, self.rng = source, client, random.Random(seed)
        self.stop = threading.Event()
        self.changes: list[str] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def put(self, name: str, n: int) -> None:
        if self.client is None:
            write_shard(self.source, name, n)
        else:
            bucket, prefix = self.source[5:].split("/", 1)
            self.client.put_object(Bucket=bucket, Key=prefix + name,
                                   Body=tar_bytes(make_samples(name.split(".")[0], n)))

    def names(self) -> list[str]:
        if self.client is None:
            return sorted(f for f in os.listdir(self.source) if f.endswith(".tar") and not f.startswith("_"))
        bucket, prefix = self.source[5:].split("/", 1)
        listed = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"][len(prefix):] for o in listed)

    def delete(self, name: str) -> None:
        if self.client is None:
            os.unlink(os.path.join(self.source, name))
        else:
            bucket, prefix = self.source[5:].split("/", 1)
            self.client.delete_object(Bucket=bucket, Key=prefix + name)

    def seed(self, shards: int = 6) -> None:
        for i in range(shards):
            self.put(f"s{i:03d}.tar", self.rng.randint(20, 40))

    def change(self, epoch: int) -> None:
        names = self.names()
        added = f"s{100 + epoch:03d}.tar"
        self.put(added, self.rng.randint(20, 40))
        self.put(names[len(names) // 2], self.rng.randint(20, 40))  # replaced: another count
        self.delete(names[0])
        self.changes.append(f"epoch {epoch}: added {added}, replaced {names[len(names) // 2]}, deleted {names[0]}")

    def _loop(self) -> None:
        while not self.stop.wait(0.02):
            for name in sorted(os.listdir(self.hand)):
                if name.startswith("want-"):
                    epoch = int(name[5:])
                    done = os.path.join(self.hand, f"done-{epoch}")
                    if not os.path.exists(done):
                        if self.before_change is not None:
                            self.before_change(epoch)
                        if epoch > 0:
                            self.change(epoch)
                        open(done, "w").close()

    def start(self) -> Writer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- launching the nodes


@dataclass
class Job:
    run: str
    port: int
    agents: list = field(default_factory=list)  # subprocess.Popen, one per node, each its own session

    def agent_log(self, node: int) -> str:
        with open(os.path.join(self.run, f"node{node}", "agent.log"), errors="replace") as f:
            return f.read()


def node_command(job: Job, node: int, source: str, *, nnodes: str, max_restarts: int, epochs: int, every: int,
                 step_seconds: float, attempts: int) -> tuple[list[str], dict]:
    """The torchrun command line and environment of one node (see the module docstring)."""
    home = os.path.join(job.run, f"node{node}")
    env = dict(os.environ, TMPDIR=os.path.join(home, "tmp"), XDG_CACHE_HOME=os.path.join(home, "cache"),
               PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    for d in ("tmp", "cache"):
        os.makedirs(os.path.join(home, d), exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=2",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{job.port}", "--rdzv_id=multinode",
           f"--rdzv_conf={RDZV_CONF}{'' if node == 0 else ',is_host=false'}", f"--max_restarts={max_restarts}", "--monitor_interval=0.2",
           os.path.join(HERE, "multinode.py"), "train", source, "--job-dir", job.run, "--node-name", f"node{node}",
           "--state-dir", os.path.join(home, "state"), "--cache-dir", os.path.join(home, "objects"),
           "--epochs", str(epochs), "--every", str(every), "--step-seconds", str(step_seconds),
           "--attempts", str(attempts)]
    return cmd, env


def launch(run: str, source: str, *, nnodes: str = "2", max_restarts: int = 3, epochs: int = 3, every: int = 4,
           step_seconds: float = 0.1, attempts: int = 3, procs: list | None = None) -> Job:
    """Starts two agents at once and waits until node 0 listens on the rendezvous port (it hosts
    the c10d store; node 1, told it is not the host, connects when the store is up). Started
    together, both join the first rendezvous round: one started after the other listens could
    miss the round's ``last_call_timeout`` while importing torch, and with ``--nnodes=1:2`` the
    job would begin with node 0 alone. ``procs`` collects them for a test fixture's teardown."""
    job = Job(run, free_port())
    for node in range(2):
        cmd, env = node_command(job, node, source, nnodes=nnodes, max_restarts=max_restarts, epochs=epochs,
                                every=every, step_seconds=step_seconds, attempts=attempts)
        out = open(os.path.join(run, f"node{node}", "agent.log"), "w")
        agent = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        job.agents.append(agent)
        if procs is not None:
            procs.append(agent)
    _wait_listening(job.port, job.agents[0])
    return job


def _wait_listening(port: int, agent, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"node 0's agent exited with {agent.returncode} before it hosted the store")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"node 0's agent did not listen on 127.0.0.1:{port} within {timeout}s")


def wait(job: Job, timeout: float, nodes=(0, 1)) -> list[int | None]:
    """Waits (bounded) for the agents of ``nodes`` to exit; returns every agent's exit code."""
    deadline = time.monotonic() + timeout
    for n in nodes:
        try:
            job.agents[n].wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    return [a.poll() for a in job.agents]


def _descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (torchrun starts each rank in a session of its own, so
    the agent's process group does not hold them)."""
    children = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children[ppid].append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_node(agent) -> None:
    """SIGKILL to a node: its agent, its ranks and their DataLoader workers, found before any of
    them dies (an orphan would leave the tree)."""
    for pid in [agent.pid, *_descendants(agent.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=10)


# --------------------------------------------------------------------------- reading the logs


def read_logs(run: str) -> dict[str, list[dict]]:
    """Every log line, by log file name (``<generation>-r<rank>.jsonl``)."""
    logs = {}
    directory = os.path.join(run, "logs")
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        with open(os.path.join(directory, name)) as f:
            logs[name] = [json.loads(line) for line in f if line.endswith("\n")]
    return logs


def events(run: str, kind: str) -> list[dict]:
    """Every event ``kind`` of every rank, oldest first."""
    return sorted((e for lines in read_logs(run).values() for e in lines if e.get("event") == kind),
                  key=lambda e: e["t"])


def mid_epoch_checkpoint(run: str, epoch: int = 1, world_size: int = 4) -> dict | None:
    """The first checkpoint taken inside ``epoch`` (not at its end) by a world of ``world_size``."""
    gens = generations(run)
    for e in events(run, "checkpoint"):
        if e["epoch"] == epoch and not e["dir"].endswith("-end") and \
                gens[e["dir"].split("-")[0]].world_size == world_size:
            return e
    return None


@dataclass
class Generation:
    """The ranks started together: their logs, and the checkpoint they resumed from."""

    id: str
    world_size: int
    parent: dict | None
    logs: dict = field(default_factory=dict)  # rank -> lines

    @property
    def done(self) -> bool:
        return all(any(e.get("event") == "done" for e in lines) for lines in self.logs.values()) and \
            len(self.logs) == self.world_size


def generations(run: str) -> dict[str, Generation]:
    gens: dict[str, Generation] = {}
    for name, lines in read_logs(run).items():
        start = next((e for e in lines if e.get("event") == "start"), None)
        if start is None:
            continue
        g = gens.setdefault(start["generation"], Generation(start["generation"], start["world_size"],
                                                            start["parent"]))
        g.logs[start["rank"]] = lines
    return gens


def chain(run: str) -> list[tuple[Generation, dict[int, int] | None]]:
    """The generations whose samples count, oldest first, each with how many sample lines of
    each rank the next one's checkpoint covers (None for the last: all of them)."""
    import torch

    gens = generations(run)
    last = [g for g in gens.values() if g.done]
    assert len(last) == 1, f"{len(last)} generations finished (expected 1): {sorted(gens)}"
    out = [(last[0], None)]
    while out[0][0].parent is not None:
        parent = out[0][0].parent
        covered = {}
        for r in range(parent["world_size"]):
            saved = torch.load(os.path.join(run, "ckpt", parent["dir"], f"rank{r}.pt"), weights_only=False)
            covered[r] = saved["samples"]
        out.insert(0, (gens[parent["generation"]], covered))
    return out


def check(run: str) -> dict:
    """Raises AssertionError on the first broken invariant, counted from the checkpoints; returns
    per epoch the snapshot, the worlds that read it, the samples each yielded and the total."""
    links = chain(run)
    per_epoch: dict[int, dict] = defaultdict(lambda: {"snapshots": set(), "keys": Counter(), "worlds": [],
                                                      "yielded": [], "padded": 0, "shards": None, "again": 0})
    for gen, covered in links:
        counts: dict[int, Counter] = {}
        for rank, lines in gen.logs.items():
            samples = [e for e in lines if "key" in e]
            if covered is not None:
                for e in samples[covered[rank]:]:  # yielded after the checkpoint, so again after the restart
                    per_epoch[e["epoch"]]["again"] += 1
                samples = samples[:covered[rank]]
            counts[rank] = Counter(e["epoch"] for e in samples)
            for e in samples:
                d = per_epoch[e["epoch"]]
                if e["pad"]:
                    d["padded"] += 1
                else:
                    d["keys"][e["key"]] += 1
            for e in lines:
                if e.get("event") == "read":  # the snapshot the consumers read (not always set_epoch's)
                    per_epoch[e["epoch"]]["snapshots"].add(e["snapshot"])
                    per_epoch[e["epoch"]]["shards"] = e["shards"]
        for epoch in sorted({ep for c in counts.values() for ep in c}):
            by_rank = [counts[r][epoch] for r in sorted(counts)]
            assert len(set(by_rank)) == 1, f"generation {gen.id}, epoch {epoch}: samples per rank {by_rank}"
            per_epoch[epoch]["worlds"].append(gen.world_size)
            per_epoch[epoch]["yielded"].append(sum(by_rank))
    report = {}
    for epoch, d in sorted(per_epoch.items()):
        assert len(d["snapshots"]) == 1, f"epoch {epoch}: ranks or restarts read snapshots {d['snapshots']}"
        twice = [k for k, c in d["keys"].items() if c > 1]
        assert not twice, f"epoch {epoch}: yielded twice, counted from the checkpoint: {twice[:5]}"
        expected = {f"{name.split('.')[0]}/{i:06d}" for name, n in d["shards"] for i in range(n)}
        stray = set(d["keys"]) - expected
        assert not stray, f"epoch {epoch}: keys not in the snapshot: {sorted(stray)[:5]}"
        assert d["padded"] == 0, f"epoch {epoch}: {d['padded']} padded samples with no shard lost mid-epoch"
        missing = len(expected) - len(d["keys"])
        allowed = sum(w - 1 for w in d["worlds"])  # left out to keep ranks equal, at most world_size - 1 per split
        assert missing <= allowed, f"epoch {epoch}: {missing} of {len(expected)} never yielded (at most {allowed})"
        report[epoch] = {"snapshot": d["snapshots"].pop(), "samples": len(expected), "worlds": d["worlds"],
                         "yielded": d["yielded"], "left_out": missing, "again": d["again"]}
    return report


def describe(report: dict) -> str:
    """One line per epoch: the snapshot's samples against what each world yielded of them."""
    lines = []
    for e, r in report.items():
        parts = " + ".join(f"{y} by world {w}" for y, w in zip(r["yielded"], r["worlds"]))
        again = f" ({r['again']} yielded after the checkpoint, then again)" if r["again"] else ""
        lines.append(f"  epoch {e}: snapshot {r['snapshot']} ({r['samples']} samples): {parts} = {sum(r['yielded'])},"
                     f" {r['left_out']} left out{again}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the demo


def demo(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or tmp
        server = None
        client = None
        if args.s3:
            import boto3
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}",
                              AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
                              AWS_SHARED_CREDENTIALS_FILE=os.devnull)
            client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
            client.create_bucket(Bucket="demo")
            source = "s3://demo/shards/"
        else:
            source = os.path.join(run, "shards")
            os.makedirs(source)
        writer = Writer(run, source, client)
        writer.seed()
        writer.start()
        for node in range(2):
            os.makedirs(os.path.join(run, f"node{node}"), exist_ok=True)
        started = time.time()
        job = launch(run, source, epochs=args.epochs)
        try:
            if args.kill_rank:
                _wait_until(lambda: mid_epoch_checkpoint(run) is not None, 120)
                victim = [e for e in events(run, "start") if e["rank"] == 1][-1]
                os.kill(victim["pid"], signal.SIGKILL)
                print(f"killed rank 1 (pid {victim['pid']}) at {time.time() - started:.1f}s")
            codes = wait(job, 300)
        finally:
            for agent in job.agents:
                kill_node(agent)
            writer.close()
            if server is not None:
                server.stop()
        print(f"agents exited with {codes} after {time.time() - started:.1f}s")
        print("\n".join(writer.changes))
        print(describe(check(run)))


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="one rank (run by torchrun)")
    t.add_argument("source")
    t.add_argument("--job-dir", dest="run", required=True)  # (torchrun takes --run and --node for its own)
    t.add_argument("--node-name", dest="node", required=True)
    t.add_argument("--state-dir", required=True)
    t.add_argument("--cache-dir", required=True)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--every", type=int, default=4)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--step-seconds", type=float, default=0.0)
    t.add_argument("--attempts", type=int, default=3)
    d = sub.add_parser("demo", help="two nodes on this machine, then the check")
    d.add_argument("--s3", action="store_true")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--kill-rank", action="store_true")
    d.add_argument("--run", help="the run directory (default: a temporary one, removed after)")
    args = parser.parse_args()
    if args.command == "train":
        return train(args)
    demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
