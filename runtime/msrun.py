"""Tensor-parallel bundles from the command line: the command relaunches itself as tp ranks under
MindSpore's msrun and relays rank 0's output."""
import os
import secrets
import shlex
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


def relaunch_under_msrun(bundle_path) -> bool:
    """A tp > 1 bundle outside msrun: run this same command as tp processes under msrun, relay
    rank 0's output, exit with its status. Returns False when there is nothing to do."""
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = Path(tempfile.mkdtemp(prefix="cogvlm2-lite-msrun-"))
    output = logs / "rank0.out"
    output.touch()
    msrun = Path(sys.executable).parent / "msrun"
    cmd = [str(msrun), f"--worker_num={tp}", f"--local_worker_num={tp}", f"--master_port={port}", "--join=True",
           f"--log_dir={logs}", str(Path(__file__).with_name("msrun_main.py")), *sys.argv[1:]]
    from .scheduler import SEED_ENV
    env = {**os.environ, OUTPUT_ENV: str(output), "GLOG_v": "3", SEED_ENV: str(secrets.randbelow(2**31)),
           "PATH": f"{msrun.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    click.echo(f"[tensor parallel: {shlex.join(cmd)}]", err=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = threading.Event()
    relay = threading.Thread(target=_relay, args=(output, done))
    relay.start()
    code = proc.wait()
    done.set()
    relay.join()
    if code != 0:
        raise UserError(f"the {tp}-rank run failed (exit {code}); worker logs are in {logs}.")
    return True


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
