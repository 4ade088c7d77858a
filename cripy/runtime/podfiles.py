"""The files every container of a pod shares: /etc/hostname, /etc/hosts, /etc/resolv.conf."""

from __future__ import annotations

import re
from pathlib import Path

from cripy.api import api_pb2 as pb
from cripy.errors import InvalidArgumentError

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")
_HOSTNAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,251}[a-zA-Z0-9])?$")
_DNS_TOKEN = re.compile(r"^[^\s#;]+$")


def pod_hostname(config: pb.PodSandboxConfig, node_hostname: str) -> str:
    """The pod's hostname: from its config, else its name (host network: the node's)."""
    if config.linux.security_context.namespace_options.network == pb.NODE:
        return node_hostname
    name = config.hostname or config.metadata.name
    if not _HOSTNAME.match(name) or len(name) > 253:
        raise InvalidArgumentError(f"hostname {name!r} is not a valid DNS name")
    return name[:63] if "." not in name else name


def resolv_conf(dns: pb.DNSConfig, host_resolv: str) -> str:
    """The DNS config as resolv.conf; none given means the node's own file."""
    if not (dns.servers or dns.searches or dns.options):
        return host_resolv
    for value in [*dns.servers, *dns.searches, *dns.options]:
        if not _DNS_TOKEN.match(value):
            raise InvalidArgumentError(f"DNS config value {value!r} is not a single word")
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def hosts_file(hostname: str, ip: str | None) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if ip:
        lines.append(f"{ip}\t{hostname}")
    return "\n".join(lines) + "\n"


def write_pod_files(directory: Path, config: pb.PodSandboxConfig, hostname: str,
                    ip: str | None) -> dict[str, str]:
    """Write the three files into `directory`; returns container path -> host path."""
    host_network = config.linux.security_context.namespace_options.network == pb.NODE
    files = {
        "/etc/hostname": hostname + "\n",
        "/etc/hosts": _read(HOST_HOSTS) if host_network else hosts_file(hostname, ip),
        "/etc/resolv.conf": resolv_conf(config.dns_config, _read(HOST_RESOLV_CONF)),
    }
    mounts = {}
    for container_path, content in files.items():
        path = directory / Path(container_path).name
        path.write_text(content)
        path.chmod(0o644)
        mounts[container_path] = str(path)
    return mounts


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
