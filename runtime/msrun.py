"""Tensor-parallel bundles from the command line: the command relaunches itself as tp ranks under
MindSpore's msrun and relays rank 0's output."""
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from .errors import UserError

OUTPUT_ENV = "COGVLM2_LITE_RANK0_OUTPUT"  # file rank 0 writes user output to under msrun


CLUSTER_ENV = "COGVLM2_LITE_CLUSTER"  # "NODES,NODE_RANK,MASTER_ADDR,MASTER_PORT" for a run across hosts

cluster_option = click.option(
    "--cluster", default=None, envvar=CLUSTER_ENV, metavar="NODES,NODE_RANK,ADDR:PORT",
    help="A tensor-parallel bundle across hosts: run the same command on each host with its node rank "
         "(0 serves and prints), ADDR:PORT the node-0 address msrun's scheduler listens on; e.g. 2,0,10.0.0.1:8118.")


def parse_cluster(value: str | None, tp: int) -> tuple[int, int, str, int]:
    """--cluster -> (nodes, node rank, master address, master port); one host (1, 0, 127.0.0.1, free port) for None.
    Raises UserError."""
    if value is None:
        return 1, 0, "127.0.0.1", 0
    try:
        nodes, node_rank, master = value.split(",")
        addr, port = master.rsplit(":", 1)
        nodes, node_rank, port = int(nodes), int(node_rank), int(port)
    except ValueError:
        raise UserError(f"--cluster {value!r} is not NODES,NODE_RANK,ADDR:PORT (e.g. 2,0,10.0.0.1:8118).") from None
    if not (nodes >= 1 and 0 <= node_rank < nodes and tp % nodes == 0 and 0 < port < 65536):
        raise UserError(f"--cluster {value!r}: {tp} ranks must split evenly over NODES hosts, NODE_RANK is 0..NODES-1 "
                        "and PORT 1..65535.")
    return nodes, node_rank, addr, port


def relaunch_under_msrun(bundle_path, cluster: str | None = None, join_timeout: int = 120) -> bool:
    """A tp > 1 bundle outside msrun: run this same command as tp processes under msrun (this host's share of
    them with --cluster), relay rank 0's output, exit with its status. SIGTERM/SIGINT here go to rank 0 (a
    server drains, then every rank stops); a rank that dies ends the run (msrun stops the others) and this
    says so. Returns False when there is nothing to do (tp 1, or already a rank)."""
    from .bundle import Bundle
    tp = Bundle(bundle_path).tp
    if tp == 1:
        return False
    if "MS_WORKER_NUM" in os.environ:  # we are a rank: send user output where the launcher reads it
        out = os.environ.get(OUTPUT_ENV)
        if out:
            rank0 = os.environ.get("MS_ROLE") == "MS_WORKER" and os.environ.get("RANK_ID") == "0"  # not the scheduler
            f = open(out if rank0 else os.devnull, "w", buffering=1)
            sys.stdout = f
            sys.stderr = f
        return False
    nodes, node_rank, addr, port = parse_cluster(cluster, tp)
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    logs = Path(tempfile.mkdtemp(prefix="cogvlm2-lite-msrun-"))
    output = logs / "rank0.out"
    output.touch()
    msrun = Path(sys.executable).parent / "msrun"
    cmd = [str(msrun), f"--worker_num={tp}", f"--local_worker_num={tp // nodes}", f"--master_addr={addr}",
           f"--master_port={port}", f"--node_rank={node_rank}", f"--cluster_time_out={join_timeout}", "--join=True",
           f"--log_dir={logs}", str(Path(__file__).with_name("msrun_main.py")), *sys.argv[1:]]
    from .scheduler import SEED_ENV
    env = {**os.environ, OUTPUT_ENV: str(output), "GLOG_v": "3", SEED_ENV: str(secrets.randbelow(2**31)),
           "PATH": f"{msrun.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    click.echo(f"[tensor parallel: {shlex.join(cmd)}]", err=True)
    # a session of its own: a terminal's Ctrl-C reaches this process only, which hands it to rank 0 (msrun's own
    # SIGINT handler would kill every rank at once, with no draining)
    with open(logs / "msrun.log", "wb") as log:   # msrun's own account: which worker exited how
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: _signal_rank0(proc.pid))
    done = threading.Event()
    relay = threading.Thread(target=_relay, args=(output, done))
    relay.start()
    try:
        code = proc.wait()
    finally:
        done.set()
        relay.join()
        _kill_tree(proc.pid)   # nothing of the run outlives this process
    if code != 0:
        raise UserError(f"the {tp}-rank run failed (msrun exit {code}){_why(logs)}; worker logs are in {logs}.")
    return True


def _ranks(msrun_pid: int) -> dict:
    """{rank: psutil.Process} of the workers msrun started on this host."""
    import psutil
    ranks = {}
    try:
        for p in psutil.Process(msrun_pid).children(recursive=True):
            try:
                env = p.environ()
            except (psutil.Error, OSError):
                continue
            if env.get("MS_ROLE") == "MS_WORKER" and "RANK_ID" in env and "msrun_main.py" in " ".join(p.cmdline()):
                ranks[int(env["RANK_ID"])] = p   # (msrun's log tailers inherit the same environment)
    except psutil.NoSuchProcess:
        pass
    return ranks


def _signal_rank0(msrun_pid: int):
    """Stop the run the graceful way: SIGTERM to rank 0 (it drains and tells the others to stop); with rank 0 on
    another host or not started yet, end msrun's run on this host."""
    rank0 = _ranks(msrun_pid).get(0)
    if rank0 is not None:
        rank0.terminate()
    else:
        _kill_tree(msrun_pid)


def _kill_tree(pid: int):
    import psutil
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _why(logs: Path) -> str:
    """What msrun's logs say went wrong, in a few words: a rank that died, or ranks that never joined."""
    text = "".join(f.read_text(errors="replace") for f in sorted(logs.glob("*.log")))
    if re.search(r"The node: \d+ is timed out|exit with exception", text):
        return ": a rank stopped (killed or crashed), so msrun stopped the others"
    if re.search(r"Failed to register|[Tt]ime ?out.*(cluster|register)|(cluster|register).*[Tt]ime ?out", text):
        return ": not every rank joined the cluster in time (check --cluster's address and port on each host)"
    return ""


def _relay(path: Path, done: threading.Event):
    with open(path) as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            elif done.is_set():
                return
            else:
                time.sleep(0.05)
