"""What a local run shows the network: `kubetune serve`'s Ray and endpoint take no job from another machine.

The local Ray of `kubetune run` and `kubetune serve` (cli/serve.py `local_ray`) is started
here as `kubetune serve` starts it, with Serve's HAProxy. Every socket its processes listen
on outside loopback is sent both of Ray's job submissions (the dashboard's and its agent's),
from this machine's own network address, as another machine on the network would.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from kubetune.runtime.contract.serving import HAPROXY_CLIENT_TIMEOUT_S

from ..integration.test_operator_restarts import free_port
from .test_local_run import KUBETUNE, Process, _local_env

pytestmark = pytest.mark.runtime

# Ray's job submissions: the dashboard's REST API and the dashboard agent's.
JOB_PATHS = ("/api/jobs/", "/api/job_agent/jobs/")
# How long an accepted job may take to run its command.
JOB_START_S = 30.0
# How long HAProxy's manager may take to replace its process after the first answer (see frontend_listening).
HAPROXY_RELOAD_S = 30.0
# Addresses outside any network: a UDP "connect" to them only asks the routing table for our source address.
ROUTE_PROBES = {socket.AF_INET: "198.51.100.1", socket.AF_INET6: "2001:db8::1"}


def network_addresses() -> dict[socket.AddressFamily, str]:
    """This machine's addresses on its default routes, the source of what it sends to other machines."""
    found = {}
    for family, probe in ROUTE_PROBES.items():
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            try:
                udp.connect((probe, 9))
            except OSError:
                continue  # no route of this family
            address = str(udp.getsockname()[0])
        if not ipaddress.ip_address(address).is_loopback:
            found[family] = address
    return found


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    process: str

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.address).is_unspecified

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def listeners_of(pid: int) -> list[Listener]:
    """The TCP sockets that a process and all its descendants (Ray's processes, HAProxy) listen on."""
    root = psutil.Process(pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline())[:80] or process.name()
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [Listener(c.laddr.ip, c.laddr.port, name) for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def frontend_listening(pid: int, port: int) -> list[Listener]:
    """The listeners of `pid`'s tree once HAProxy's frontend on `port` is among them (or the last seen).

    Serve's HAProxy manager replaces its HAProxy process when the proxies it fronts change, which can
    happen just after the first answer: for a moment the old process is gone and the new one not yet
    listed, so one snapshot may miss the frontend that answered a moment ago.
    """
    deadline = time.monotonic() + HAPROXY_RELOAD_S
    while True:
        listening = listeners_of(pid)
        if any(listener.port == port for listener in listening) or time.monotonic() > deadline:
            return listening
        time.sleep(0.5)


def targets(listener: Listener, addresses: dict[socket.AddressFamily, str]) -> list[str]:
    """Where another machine reaches a listener: its own address, or ours where it listens on all."""
    if not listener.wildcard:
        return [listener.address]
    if ipaddress.ip_address(listener.address).version == 4:
        return [addresses[socket.AF_INET]] if socket.AF_INET in addresses else []
    return list(addresses.values())  # an IPv6 wildcard takes IPv4 too, unless it is v6-only


def submit_job(address: str, port: int, path: str, source: str, marker: Path) -> str:
    """A job submission that would create `marker`, sent from `source`: what came back."""
    body = json.dumps({"entrypoint": f"touch {marker}", "submission_id": f"probe-{port}-{len(path)}"})
    connection = http.client.HTTPConnection(address, port, timeout=10, source_address=(source, 0))
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return str(response.status)
    except ConnectionRefusedError:
        return "refused"
    except (OSError, http.client.HTTPException) as error:
        return f"no HTTP answer ({type(error).__name__})"
    finally:
        connection.close()


def accepted(outcome: str) -> bool:
    return outcome.isdigit() and 200 <= int(outcome) < 300


def tiny_text_classifier(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier with MiniLM's tokenizer: an endpoint that starts fast."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from .conftest import minilm_dir

    torch.manual_seed(0)
    config = BertConfig(  # two labels, the default
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Process]:
    """`kubetune serve` of a tiny classifier, ready; Ctrl-C stops it and its Ray at the end."""
    folder = tiny_text_classifier(tmp_path / "model")
    port = free_port()
    process = Process([str(KUBETUNE), "serve", str(folder), "--port", str(port)], tmp_path, _local_env())
    try:
        process.wait_for(r"^ready http://", 600)
        yield process
    finally:
        if process.popen.poll() is None:
            assert process.interrupt() == 0, process.text()


def test_no_listener_of_a_local_endpoint_takes_a_job_from_the_network(serving: Process, tmp_path: Path) -> None:
    addresses = network_addresses()
    if not addresses:
        pytest.skip("this machine has no address outside loopback: nothing on the network can reach it")
    port = int(serving.wait_for(r"^ready http://", 1).split(":")[-1].split("/")[0])
    listening = frontend_listening(serving.popen.pid, port)
    assert any(listener.port == port for listener in listening), f"HAProxy's frontend missing from {listening}"

    marker = tmp_path / "a-job-ran"
    outcomes = {}
    for listener in listening:
        if listener.loopback:
            continue
        for address in targets(listener, addresses):
            for path in JOB_PATHS:
                outcome = submit_job(address, listener.port, path, address, marker)
                outcomes[f"POST {address}:{listener.port}{path} ({listener.process})"] = outcome
    shown = "\n".join(f"  {what} -> {outcome}" for what, outcome in outcomes.items())
    print("listeners:\n" + "\n".join(f"  {item.address}:{item.port} ({item.process})" for item in listening))
    print(f"listeners outside loopback, and what a job submission got:\n{shown}")
    if any(accepted(outcome) for outcome in outcomes.values()):
        deadline = time.monotonic() + JOB_START_S
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        ran = "and its command ran" if marker.exists() else f"(its command did not run within {JOB_START_S:.0f} s)"
        pytest.fail(f"a job was accepted {ran}:\n{shown}")
    assert not marker.exists(), f"a job ran:\n{shown}"

    # Starting `kubetune serve` costs a minute: the same endpoint shows that HAProxy drops idle clients.
    config = haproxy_config(serving.popen.pid)
    assert re.search(rf"^\s*timeout client {HAPROXY_CLIENT_TIMEOUT_S}s$", config, re.MULTILINE), config


def haproxy_config(pid: int) -> str:
    """The configuration file of the HAProxy that `kubetune serve` (process `pid`) started."""
    root = psutil.Process(pid)
    for process in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = process.cmdline()
            if command and command[0].endswith("haproxy") and "-f" in command:
                return Path(command[command.index("-f") + 1]).read_text(encoding="utf-8")
    raise AssertionError("no HAProxy among the processes of kubetune serve")
