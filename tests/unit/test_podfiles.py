from __future__ import annotations

from pathlib import Path

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError
from cripy.runtime.podfiles import hosts_file, pod_hostname, resolv_conf, write_pod_files


def config(name: str = "web", hostname: str = "", network: pb.NamespaceMode = pb.POD,
           dns: pb.DNSConfig | None = None) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="ns", uid="u"),
        hostname=hostname, dns_config=dns,
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=network))))


def test_hostname_from_config_name_or_node() -> None:
    assert pod_hostname(config(hostname="api-0"), "node1") == "api-0"
    assert pod_hostname(config(name="web"), "node1") == "web"
    assert pod_hostname(config(network=pb.NODE), "node1") == "node1"
    with pytest.raises(InvalidArgumentError, match="bad_name!"):
        pod_hostname(config(hostname="bad_name!"), "node1")


def test_resolv_conf_from_dns_config_or_host() -> None:
    dns = pb.DNSConfig(servers=["10.96.0.10"], searches=["ns.svc.cluster.local", "svc"],
                       options=["ndots:5"])
    assert resolv_conf(dns, "host\n") == (
        "nameserver 10.96.0.10\nsearch ns.svc.cluster.local svc\noptions ndots:5\n")
    assert resolv_conf(pb.DNSConfig(), "nameserver 1.1.1.1\n") == "nameserver 1.1.1.1\n"
    with pytest.raises(InvalidArgumentError, match="injected"):
        resolv_conf(pb.DNSConfig(servers=["1.2.3.4\nnameserver injected"]), "")


def test_hosts_names_the_pod() -> None:
    text = hosts_file("web", "10.0.0.5")
    assert "127.0.0.1\tlocalhost" in text and "10.0.0.5\tweb" in text


def test_write_pod_files(tmp_path: Path) -> None:
    mounts = write_pod_files(tmp_path, config(), "web", "10.0.0.5")
    assert set(mounts) == {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}
    assert Path(mounts["/etc/hostname"]).read_text() == "web\n"
    assert Path(mounts["/etc/hosts"]).stat().st_mode & 0o777 == 0o644
