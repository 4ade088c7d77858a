"""CNI with real plugins (bridge, host-local, portmap, loopback) and real namespaces.

Each test gets its own network: a bridge `cripyt<4 hex>`, a random 10.213.x.0/24, and
host-local state in tmp_path. Every test tears down, unpins and deletes its bridge in a
finalizer, whatever happened.

Host ports: portmap DNATs traffic to local addresses. 127.0.0.1:hostPort works because
portmap (snat, the default) sets route_localnet on the bridge and masquerades; the
bridge gateway and the node's own address work too, the latter since the pod has a
default route back through the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shlex
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cripy.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from cripy.network.cni import CNIManager, PortMapping
from cripy.network.namespaces import is_pinned, pin_namespaces, unpin_namespaces

PLUGINS = Path("/usr/lib/cni")



@dataclass
class Net:
    tmp: Path
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    conf_dir: Path
    cache_dir: Path
    data_dir: Path
    fake_dir: Path
    ns_dir: Path
    pod_ids: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def netns(self) -> Path:
        return self.ns_dir / "net"

    def manager(self, timeout: float = 60) -> CNIManager:
        return CNIManager(str(self.conf_dir), [str(self.fake_dir), str(PLUGINS)],
                          self.cache_dir, timeout=timeout)

    def write_conflist(self, *after_bridge: dict[str, Any], filename: str = "10-test.conflist",
                       version: str = "1.0.0") -> Path:
        bridge = {"type": "bridge", "bridge": self.bridge, "isGateway": True,
                  "ipMasq": False,
                  "ipam": {"type": "host-local", "subnet": str(self.subnet),
                           "dataDir": str(self.data_dir), "routes": [{"dst": "0.0.0.0/0"}]}}
        path = self.conf_dir / filename
        path.write_text(json.dumps({"cniVersion": version, "name": self.name,
                                    "plugins": [bridge, *after_bridge]}))
        return path

    def fake_plugin(self, name: str, script: str) -> None:
        path = self.fake_dir / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)

    def new_pod_id(self) -> str:
        pod_id = "cripytest" + secrets.token_hex(8)
        self.pod_ids.append(pod_id)
        return pod_id

    def allocated(self) -> list[str]:
        """Addresses host-local holds (one file per address)."""
        directory = self.data_dir / self.name
        if not directory.exists():
            return []
        return sorted(p.name for p in directory.iterdir()
                      if p.name not in ("lock",) and not p.name.startswith("last_reserved"))

    def veths(self) -> list[str]:
        return sh(f"ip -o link show master {self.bridge} 2>/dev/null || true").splitlines()


PORTMAP = {"type": "portmap", "capabilities": {"portMappings": True}}


def sh(command: str) -> str:
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30,
                          check=False).stdout


def nat_rules_of(pod_id: str) -> list[str]:
    return [line for line in sh("iptables-save -t nat").splitlines() if pod_id in line]


def purge_iptables(pod_id: str) -> None:
    """Last resort for a failed test: drop portmap rules and chains naming the pod."""
    for line in nat_rules_of(pod_id):
        parts = shlex.split(line)
        if parts[:1] == ["-A"]:
            subprocess.run(["iptables", "-t", "nat", "-D", *parts[1:]], capture_output=True,
                           check=False)
            if "-j" in parts:
                chain = parts[parts.index("-j") + 1]
                if chain.startswith("CNI-DN-"):
                    sh(f"iptables -t nat -F {chain}; iptables -t nat -X {chain}")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    suffix = secrets.token_hex(2)
    n = Net(tmp=tmp_path, name=f"cripy-test-{suffix}", bridge=f"cripyt{suffix}",
            subnet=ipaddress.IPv4Network(f"10.213.{random.randrange(1, 255)}.0/24"),
            conf_dir=tmp_path / "net.d", cache_dir=tmp_path / "cache",
            data_dir=tmp_path / "ipam", fake_dir=tmp_path / "bin", ns_dir=tmp_path / "ns")
    for d in (n.conf_dir, n.fake_dir):
        d.mkdir()
    try:
        yield n
    finally:
        manager = n.manager(timeout=10)
        for pod_id in n.pod_ids:
            with contextlib.suppress(Exception):
                asyncio.run(manager.teardown(pod_id, n.netns))
            purge_iptables(pod_id)
        asyncio.run(unpin_namespaces(n.ns_dir))
        sh(f"ip link del {n.bridge} 2>/dev/null")


def pin(n: Net) -> Path:
    return asyncio.run(pin_namespaces(n.ns_dir, ["net"], None))["net"]


def ping(address: str, timeout: float = 2.0) -> bool:
    """One ICMP echo over a raw socket (no ping binary needed)."""
    ident, seq = os.getpid() & 0xFFFF, 1
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    payload = b"cripy-ping"
    data = header + payload
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    packet = struct.pack("!BBHHH", 8, 0, checksum, ident, seq) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (address, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply, peer = s.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = reply[(reply[0] & 0x0F) * 4:]
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if peer[0] == address and kind == 0 and (rid, rseq) == (ident, seq):
                return True
    return False


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"hello from the pod to {peer[0]}".encode())
    c.close()
"""


@contextlib.contextmanager
def server_in(netns: Path, port: int) -> Iterator[None]:
    proc = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", SERVER,
                             str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()


def fetch(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=3) as conn:
        return conn.recv(200).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_ipv4(exclude: ipaddress.IPv4Network) -> str | None:
    for line in sh("ip -4 -o addr show scope global").splitlines():
        address = line.split()[3].split("/")[0]
        if ipaddress.IPv4Address(address) not in exclude:
            return address
    return None


def setup(manager: CNIManager, pod_id: str, netns: Path,
          ports: tuple[PortMapping, ...] = ()) -> Any:
    return asyncio.run(manager.setup(pod_id, netns, pod_name="web-0", pod_namespace="default",
                                     pod_uid="uid-1", port_mappings=ports))


# --- the whole life of a pod network -------------------------------------------------------


def test_setup_reaches_the_pod_maps_ports_and_teardown_releases_all(net: Net) -> None:
    net.write_conflist(PORTMAP)
    manager = net.manager()
    netns = pin(net)
    sh(f"nsenter --net={netns} ip link set lo down")  # as a namespace of others' comes
    pod_id = net.new_pod_id()
    host_port = free_port()

    network = setup(manager, pod_id, netns, (PortMapping("tcp", 8080, host_port),))

    ip = network.ips[0]
    assert len(network.ips) == 1 and ipaddress.IPv4Address(ip) in net.subnet
    assert network.interface == "eth0" and network.result["cniVersion"] == "1.0.0"
    assert f"inet {ip}/24" in sh(f"nsenter --net={netns} ip -4 -o addr show eth0")
    assert ",UP," in sh(f"nsenter --net={netns} ip -o link show lo")  # the loopback plugin
    assert net.allocated() == [ip]
    assert ping(ip)
    assert nat_rules_of(pod_id), "portmap added no rules"

    with server_in(netns, 8080):
        assert fetch(ip, 8080).startswith("hello from the pod")
        assert fetch("127.0.0.1", host_port).startswith("hello from the pod")
        assert fetch(net.gateway, host_port).startswith("hello from the pod")
        node = node_ipv4(net.subnet)
        if node is not None:
            assert fetch(node, host_port).startswith("hello from the pod")

    cache = json.loads((net.cache_dir / f"{pod_id}.json").read_text())
    assert cache["config"] == json.loads((net.conf_dir / "10-test.conflist").read_text())
    assert cache["ifName"] == "eth0" and cache["netns"] == str(netns)
    assert cache["cniArgs"] == ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                                f"K8S_POD_INFRA_CONTAINER_ID={pod_id};K8S_POD_UID=uid-1")
    assert cache["runtimeConfig"] == {"portMappings": [
        {"hostPort": host_port, "containerPort": 8080, "protocol": "tcp"}]}
    assert cache["result"] == network.result

    asyncio.run(manager.teardown(pod_id, netns))
    assert net.allocated() == []
    assert nat_rules_of(pod_id) == []
    assert net.veths() == []
    assert not (net.cache_dir / f"{pod_id}.json").exists()
    assert ",UP," not in sh(f"nsenter --net={netns} ip -o link show lo")  # lo DEL too
    asyncio.run(manager.teardown(pod_id, netns))  # idempotent
    asyncio.run(manager.teardown(pod_id, None))


def test_no_loopback_plugin_when_the_caller_brought_lo_up(net: Net) -> None:
    net.write_conflist(PORTMAP)
    netns = pin(net)  # pinned with lo up
    pod_id = net.new_pod_id()
    network = asyncio.run(net.manager().setup(
        pod_id, netns, pod_name="web-0", pod_namespace="default", pod_uid="uid-1",
        lo_is_up=True))
    assert json.loads((net.cache_dir / f"{pod_id}.json").read_text())["loopback"] is None
    assert ",UP," in sh(f"nsenter --net={netns} ip -o link show lo")
    assert ping(network.ips[0])
    asyncio.run(net.manager().teardown(pod_id, netns))
    assert net.allocated() == [] and net.veths() == []


def test_teardown_uses_the_cache_after_restart_and_config_removal(net: Net) -> None:
    conflist = net.write_conflist(PORTMAP)
    netns = pin(net)
    pod_id = net.new_pod_id()
    network = setup(net.manager(), pod_id, netns, (PortMapping("tcp", 80, free_port()),))
    assert net.allocated() == network.ips and nat_rules_of(pod_id)

    conflist.unlink()
    asyncio.run(unpin_namespaces(net.ns_dir))  # the namespace is gone too (a reboot, say)
    restarted = net.manager()
    assert restarted.network() is None
    asyncio.run(restarted.teardown(pod_id, netns))

    assert net.allocated() == []
    assert nat_rules_of(pod_id) == []
    assert not (net.cache_dir / f"{pod_id}.json").exists()
    asyncio.run(restarted.teardown(pod_id, None))


def test_teardown_without_a_namespace_still_releases_the_address(net: Net) -> None:
    net.write_conflist()
    netns = pin(net)
    pod_id = net.new_pod_id()
    setup(net.manager(), pod_id, netns)
    asyncio.run(unpin_namespaces(net.ns_dir))
    asyncio.run(net.manager().teardown(pod_id, None))
    assert net.allocated() == []


def test_a_second_setup_replaces_the_first(net: Net) -> None:
    net.write_conflist()
    manager = net.manager()
    netns = pin(net)
    pod_id = net.new_pod_id()
    setup(manager, pod_id, netns)
    again = setup(manager, pod_id, netns)
    assert net.allocated() == again.ips and len(net.veths()) == 1
    asyncio.run(manager.teardown(pod_id, netns))
    assert net.allocated() == []


def test_check_passes_then_fails_once_the_interface_is_gone(net: Net) -> None:
    # portmap 1.1 cannot CHECK IPv4-only pods (containernetworking/plugins#819): no portmap.
    net.write_conflist()
    manager = net.manager()
    netns = pin(net)
    pod_id = net.new_pod_id()
    setup(manager, pod_id, netns)
    asyncio.run(manager.check(pod_id, netns))
    sh(f"nsenter --net={netns} ip link del eth0")
    with pytest.raises((UnavailableError, FailedPreconditionError), match="bridge CHECK"):
        asyncio.run(manager.check(pod_id, netns))
    asyncio.run(manager.teardown(pod_id, netns))
    with pytest.raises(FailedPreconditionError, match="no network"):
        asyncio.run(manager.check(pod_id, netns))


def test_an_040_list_also_works(net: Net) -> None:
    net.write_conflist(PORTMAP, version="0.4.0")
    manager = net.manager()
    netns = pin(net)
    pod_id = net.new_pod_id()
    network = setup(manager, pod_id, netns, (PortMapping("udp", 53, free_port()),))
    assert network.result["cniVersion"] == "0.4.0" and net.allocated() == network.ips
    asyncio.run(manager.teardown(pod_id, netns))
    assert net.allocated() == [] and nat_rules_of(pod_id) == []


RECORDER = """
import json, os, sys
conf = json.load(sys.stdin)
command = os.environ["CNI_COMMAND"]
env = {k: v for k, v in os.environ.items() if k.startswith("CNI_")}
with open(os.path.join(sys.argv[0] + ".log"), "a") as log:
    log.write(json.dumps({"env": env, "conf": conf}) + "\\n")
if command == "ADD":
    print(json.dumps(conf["prevResult"]))
elif command == "DEL" and not os.path.exists(sys.argv[0] + ".failed-once"):
    open(sys.argv[0] + ".failed-once", "w").close()
    print(json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "busy, try again"}))
    sys.exit(1)
"""


def test_what_plugins_see_and_a_failed_teardown_is_retried(net: Net) -> None:
    recorder = net.fake_dir / "cripy-recorder"
    recorder.write_text(f"#!{sys.executable}\n{RECORDER}")
    recorder.chmod(0o755)
    net.write_conflist({"type": "cripy-recorder", "capabilities": {"portMappings": True},
                        "custom": "kept"})
    manager = net.manager()
    netns = pin(net)
    pod_id = net.new_pod_id()
    port = free_port()
    network = setup(manager, pod_id, netns, (PortMapping("sctp", 9, port, "127.0.0.1"),))

    def calls() -> list[dict[str, Any]]:
        lines = (net.fake_dir / "cripy-recorder.log").read_text().splitlines()
        return [json.loads(line) for line in lines]

    [add] = calls()
    assert add["env"] == {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": pod_id, "CNI_NETNS": str(netns),
        "CNI_IFNAME": "eth0", "CNI_PATH": f"{net.fake_dir}:{PLUGINS}",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                    f"K8S_POD_INFRA_CONTAINER_ID={pod_id};K8S_POD_UID=uid-1"}
    conf = add["conf"]
    assert (conf["name"], conf["cniVersion"], conf["custom"]) == (net.name, "1.0.0", "kept")
    assert conf["runtimeConfig"] == {"portMappings": [
        {"hostPort": port, "containerPort": 9, "protocol": "sctp", "hostIP": "127.0.0.1"}]}
    assert conf["prevResult"] == network.result  # the bridge's result, passed through
    assert conf["prevResult"]["ips"][0]["address"].startswith(network.ips[0] + "/")

    with pytest.raises(UnavailableError, match="cripy-recorder DEL.*busy, try again"):
        asyncio.run(manager.teardown(pod_id, netns))
    assert (net.cache_dir / f"{pod_id}.json").exists()  # kept for the retry
    asyncio.run(manager.teardown(pod_id, netns))
    assert not (net.cache_dir / f"{pod_id}.json").exists() and net.allocated() == []
    first_del, second_del = calls()[1:]
    for call in (first_del, second_del):
        assert call["env"]["CNI_COMMAND"] == "DEL"
        assert call["conf"]["prevResult"] == network.result
        assert call["conf"]["runtimeConfig"] == conf["runtimeConfig"]


# --- failures -----------------------------------------------------------------------------


ERROR_JSON = ('{"cniVersion":"1.0.0","code":%d,"msg":"no luck today",'
              '"details":"the fake plugin always fails"}')


@pytest.mark.parametrize("script, error, words", [
    (f"cat >/dev/null; echo '{ERROR_JSON % 100}'; exit 1", UnavailableError,
     ["cripy-fake ADD", "no luck today", "always fails", "code 100"]),
    (f"cat >/dev/null; echo '{ERROR_JSON % 7}'; exit 1", FailedPreconditionError,
     ["cripy-fake ADD", "no luck today", "code 7"]),
    ("cat >/dev/null; echo 'Segmentation fault' >&2; exit 139", UnavailableError,
     ["cripy-fake ADD", "Segmentation fault"]),
    ("cat >/dev/null; echo 'this is not json'", UnavailableError,
     ["cripy-fake ADD", "invalid result"]),
])
def test_a_failing_plugin_is_reported_and_rolled_back(
        net: Net, script: str, error: type[Exception], words: list[str]) -> None:
    net.fake_plugin("cripy-fake", script)
    net.write_conflist(PORTMAP, {"type": "cripy-fake"})
    manager = net.manager()
    netns = pin(net)
    pod_id = net.new_pod_id()
    with pytest.raises(error) as info:
        setup(manager, pod_id, netns, (PortMapping("tcp", 80, free_port()),))
    for word in words:
        assert word in str(info.value)
    assert not (net.cache_dir / f"{pod_id}.json").exists()
    assert net.allocated() == []
    assert nat_rules_of(pod_id) == []
    assert net.veths() == []
    assert len(sh(f"nsenter --net={netns} ip -o link").splitlines()) == 1  # only lo left


def test_a_hanging_plugin_is_killed_after_the_timeout(net: Net) -> None:
    pidfile = net.tmp / "sleeper.pid"
    net.fake_plugin("cripy-hang", f"""
if [ "$CNI_COMMAND" = ADD ]; then
    sleep 300 &
    echo $! > {pidfile}
    wait
fi
""")
    net.write_conflist({"type": "cripy-hang"})
    manager = net.manager(timeout=1.5)
    netns = pin(net)
    pod_id = net.new_pod_id()
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="cripy-hang ADD"):
        setup(manager, pod_id, netns)
    assert time.monotonic() - started < 1.5 + 5  # the timeout plus the rollback
    assert not (net.cache_dir / f"{pod_id}.json").exists()
    assert net.allocated() == []
    sleeper = int(pidfile.read_text())
    for _ in range(50):  # killed with its plugin's process group
        state = sh(f"cat /proc/{sleeper}/stat 2>/dev/null").split(")")[-1].split()
        if not state or state[0] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the plugin's child survived")


def test_a_missing_plugin_is_a_failed_precondition(net: Net) -> None:
    net.write_conflist({"type": "cripy-not-installed"})
    netns = pin(net)
    pod_id = net.new_pod_id()
    with pytest.raises(FailedPreconditionError, match="cripy-not-installed.*not found"):
        setup(net.manager(), pod_id, netns)
    assert net.allocated() == [] and not (net.cache_dir / f"{pod_id}.json").exists()


def test_requests_are_checked_before_any_plugin_runs(net: Net) -> None:
    manager = net.manager()
    missing = net.tmp / "no-such-netns"
    with pytest.raises(FailedPreconditionError, match="no valid CNI network"):
        setup(manager, "pod1", missing)
    net.write_conflist()
    with pytest.raises(FailedPreconditionError, match="does not exist"):
        setup(manager, "pod1", missing)
    netns = pin(net)
    with pytest.raises(InvalidArgumentError):
        setup(manager, "../../etc/passwd", netns)
    with pytest.raises(InvalidArgumentError, match="protocol"):
        setup(manager, "pod1", netns, (PortMapping("icmp", 1, 2),))
    with pytest.raises(InvalidArgumentError, match="1-65535"):
        setup(manager, "pod1", netns, (PortMapping("tcp", 80, 70000),))
    with pytest.raises(InvalidArgumentError):
        asyncio.run(manager.setup("pod1", netns, pod_name="a;IP=1.2.3.4", pod_namespace="d",
                                  pod_uid="u"))
    assert net.allocated() == [] and not net.cache_dir.exists()
    assert is_pinned(netns)


# --- configuration ------------------------------------------------------------------------


def test_the_first_valid_config_by_name_is_the_network(net: Net) -> None:
    manager = net.manager()
    assert manager.network() is None
    (net.conf_dir / "05-broken.conflist").write_text("{")
    (net.conf_dir / "07-notes.txt").write_text("ignored")
    net.write_conflist(filename="20-second.conflist")
    assert manager.network() is not None
    assert manager.network().source.endswith("20-second.conflist")  # type: ignore[union-attr]
    single = {"cniVersion": "0.4.0", "name": "single", "type": "bridge"}
    (net.conf_dir / "10-single.conf").write_text(json.dumps(single))
    network = manager.network()
    assert network is not None and network.name == "single"
    assert network.plugin_types == ["bridge"]
    (net.conf_dir / "10-single.conf").unlink()
    assert manager.network() is not None
    assert manager.network().name == net.name  # type: ignore[union-attr]
