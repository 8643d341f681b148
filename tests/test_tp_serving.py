"""Issue 29: a tensor-parallel bundle behind the OpenAI API. `serve` launches msrun; rank 0 is the front and the
scheduler and sends each step's plan to every rank; on one host and across two hosts (two network namespaces
joined by a veth pair); a rank that dies ends the streams and the server; SIGTERM drains and ends every rank."""
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from cogvlm2_lite.runtime.engine import Engine, Request
from cogvlm2_lite.runtime.sampling import SamplingParams

CLI = str(Path(sys.executable).parent / "cogvlm2-lite")
PROMPTS = [("tell me something", False), ("what is in the picture?", True)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, prefix=(), seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        probe = f"import urllib.request; print(urllib.request.urlopen({url + '/health'!r}, timeout=2).read().decode())"
        r = subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True, text=True)
        if '"ok"' in r.stdout:
            return
        time.sleep(1)
    raise AssertionError("the tp server did not become healthy")


def leftovers(bundle) -> list:
    """Processes of a run on `bundle` still alive (ranks, msrun, its scheduler)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(bundle) in cmd and ("msrun" in cmd or "serve" in cmd) and p.pid != os.getpid():
            out.append(cmd)
    return out


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, seconds=60) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(seconds)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def want(tiny_bundle, photo):
    """tp 1's greedy answers, text-only and with the image."""
    e = Engine(tiny_bundle, prefix_cache=False)
    return {p: e.generate([Request(p, image=photo if img else None, params=SamplingParams(max_new_tokens=8))])[0].text
            for p, img in PROMPTS}


def ask(url: str, model: str, photo, prefix=()) -> dict:
    """Each prompt, streamed and not, through the openai client (in `prefix`'s network namespace when given)."""
    image = "data:image/png;base64," + base64.b64encode(Path(photo).read_bytes()).decode()
    script = f"""
import json, openai
c = openai.OpenAI(base_url={url + '/v1'!r}, api_key="x", max_retries=0, timeout=120)
out = {{}}
for prompt, img in {PROMPTS!r}:
    content = [{{"type": "text", "text": prompt}}] + ([{{"type": "image_url", "image_url": {{"url": {image!r}}}}}] if img else [])
    kw = dict(model={model!r}, messages=[{{"role": "user", "content": content}}], max_tokens=8, temperature=0)
    full = c.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw) if ch.choices)
    out[prompt] = [full, streamed]
print(json.dumps(out))
"""
    r = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def serve_tp(bundle) -> tuple[subprocess.Popen, str]:
    """`serve` on a tp bundle on loopback, healthy -> (the launcher process, its URL)."""
    port = free_port()
    proc = subprocess.Popen([CLI, "serve", str(bundle), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def test_tp2_server_answers_as_tp1_and_drains_on_sigterm(tiny_bundle_tp2, want, photo):
    proc, url = serve_tp(tiny_bundle_tp2)
    try:
        got = ask(url, Path(tiny_bundle_tp2).name, photo)
        assert got == {p: [want[p], want[p]] for p, _ in PROMPTS}
    finally:
        code = stop(proc)
    assert code == 0, proc.stderr.read()
    assert leftovers(tiny_bundle_tp2) == []


def rank_process(bundle, rank: int) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "msrun_main.py" in cmd and str(bundle) in cmd:
            env = p.environ()
            if env.get("MS_ROLE") == "MS_WORKER" and env.get("RANK_ID") == str(rank):
                return p
    raise AssertionError(f"no rank {rank} process")


def test_a_rank_that_dies_ends_the_streams_and_the_server(tiny_bundle_tp2):
    proc, url = serve_tp(tiny_bundle_tp2)
    try:
        body = {"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 60, "temperature": 0.9,
                "stream": True}
        lines = []
        with pytest.raises((httpx.HTTPError, AssertionError)):   # a cut connection, or no [DONE]
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if len([x for x in lines if x.startswith("data:")]) == 3:
                        rank_process(tiny_bundle_tp2, 1).kill()
            assert "data: [DONE]" in lines, "the stream ended without its end"
        code = proc.wait(60)   # the bound: raises TimeoutExpired past it
        assert code != 0
        err = proc.stderr.read().strip().splitlines()
        assert err[-1].startswith("error: the 2-rank run failed") and "a rank stopped" in err[-1], err[-3:]
        assert "Traceback" not in "\n".join(err)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    assert leftovers(tiny_bundle_tp2) == []


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 'hosts' 10.231.x.1 and 10.231.x.2 (root only)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = uuid.uuid4().hex[:6]
    a, b, net = f"cvA{tag}", f"cvB{tag}", f"10.231.{int(tag[:2], 16) % 250}"
    steps = [["netns", "add", a], ["netns", "add", b],
             ["link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
             ["link", "set", f"va{tag}", "netns", a], ["link", "set", f"vb{tag}", "netns", b],
             ["-n", a, "addr", "add", f"{net}.1/24", "dev", f"va{tag}"],
             ["-n", b, "addr", "add", f"{net}.2/24", "dev", f"vb{tag}"],
             ["-n", a, "link", "set", f"va{tag}", "up"], ["-n", b, "link", "set", f"vb{tag}", "up"],
             ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"]]
    try:
        for step in steps:
            r = subprocess.run(["ip", *step], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"network namespaces cannot be made here: ip {' '.join(step)}: {r.stderr.strip()}")
        yield (["ip", "netns", "exec", a], f"{net}.1"), (["ip", "netns", "exec", b], f"{net}.2")
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_tp2_across_two_namespace_hosts(tiny_bundle_tp2, want, photo, two_hosts):
    (in_a, addr_a), (in_b, _) = two_hosts
    port = 8440
    cluster = f"{addr_a}:{port + 1}"
    host0 = subprocess.Popen([*in_a, CLI, "serve", str(tiny_bundle_tp2), "--host", addr_a, "--port", str(port),
                              "--cluster", f"2,0,{cluster}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host1 = subprocess.Popen([*in_b, CLI, "serve", str(tiny_bundle_tp2), "--cluster", f"2,1,{cluster}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://{addr_a}:{port}"
    try:
        wait_healthy(url, host0, prefix=in_a)
        got = ask(url, Path(tiny_bundle_tp2).name, photo, prefix=in_a)
        assert got == {p: [want[p], want[p]] for p, _ in PROMPTS}
    finally:
        code0 = stop(host0)   # rank 0 drains, then tells rank 1 (on the other host) to stop
        try:
            code1 = host1.wait(60)
        finally:
            if host1.poll() is None:
                host1.kill()
    assert code0 == 0 and code1 == 0, (host0.stderr.read(), host1.stderr.read())
    assert leftovers(tiny_bundle_tp2) == []


@pytest.mark.parametrize("tp", [1, 2])
def test_bench_tp_splits_a_step_into_graphs_plan_broadcast_and_host(tp, tiny_bundle, tiny_bundle_tp2, tmp_path):
    """bench-tp runs tp 1 here and tp 2 under msrun on the same terms: one plan per step (the prompt's prefill, then
    one per decode step), broadcast only with tp > 1, and a report whose parts add up to the steps measured."""
    bundle = tiny_bundle if tp == 1 else tiny_bundle_tp2
    out = tmp_path / "tp.json"
    r = subprocess.run([CLI, "bench-tp", str(bundle), "--reps", "2", "--warmup", "1", "--gen-tokens", "4",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["tp"] == tp and r.stdout.startswith(f"tp {tp}: TTFT text ")
    decode = report["decode"]
    assert decode["tokens"] == 4 and decode["per_step"]["graph_s"] > 0 and decode["s_per_token"] > 0
    for case in ("ttft_text", "ttft_image"):
        assert report[case]["s"] > 0 and report[case]["graph_s"]
    if tp == 1:
        assert decode["plans"] is None and decode["per_step"]["plan_broadcast_s"] == 0
    else:   # the prefill's plan, then 3 decode steps'
        assert decode["plans"] == 4 and report["ttft_text"]["plans"] == 1 and decode["per_step"]["plan_broadcast_s"] > 0
        assert "vision" in report["ttft_image"]["graph_s"]
    assert leftovers(bundle) == []
