"""CNI data, sans-IO: network config lists, per-plugin stdin, plugin results and errors.

Pure functions over bytes and dicts, so they are tested without plugins or namespaces;
`cni.py` does the process handling around them. Result shapes follow the CNI spec:
0.1.0/0.2.0 (`ip4`/`ip6`), 0.3.x/0.4.0 (`ips` with `version`) and 1.x (`ips` without it).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Result versions cripy reads; older ones are converted to the `ips` form on parsing.
LEGACY_VERSIONS = frozenset({"0.1.0", "0.2.0"})
RESULT_VERSIONS = frozenset({"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}) | LEGACY_VERSIONS

# Spec grammar for network names and container IDs.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# CNI well-known error codes that mean "your config or call is wrong", not "try later".
CONFIG_ERROR_CODES = frozenset({1, 2, 4, 6, 7})


class CNIFormatError(ValueError):
    """A config list or a plugin's output does not have the shape the spec requires."""


# --- network configuration lists ----------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    disable_check: bool = False
    source: str = ""  # the file it came from, for messages
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # as loaded

    @property
    def plugin_types(self) -> list[str]:
        return [str(p["type"]) for p in self.plugins]


def parse_config_list(data: bytes | str, source: str = "") -> NetworkConfigList:
    """A .conflist, or a single-plugin .conf wrapped into a list as libcni does."""
    where = f" in {source}" if source else ""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIFormatError(f"CNI config{where} is not valid JSON: {exc}") from None
    return config_list_from_dict(obj, source)


def config_list_from_dict(obj: Any, source: str = "") -> NetworkConfigList:
    where = f" in {source}" if source else ""
    if not isinstance(obj, dict):
        raise CNIFormatError(f"CNI config{where} is not a JSON object")
    if "plugins" in obj:
        plugins = obj["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise CNIFormatError(f"CNI config{where}: 'plugins' must be a non-empty list")
    else:
        plugins = [obj]
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CNIFormatError(f"CNI config{where}: network name {name!r} is missing or invalid")
    version = obj.get("cniVersion")
    if not isinstance(version, str) or not re.match(r"^\d+\.\d+\.\d+$", version):
        raise CNIFormatError(f"CNI config{where}: cniVersion {version!r} is missing or invalid")
    disable_check = obj.get("disableCheck", False)
    if isinstance(disable_check, str):  # the spec's own examples use a string
        disable_check = disable_check.lower() == "true"
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise CNIFormatError(f"CNI config{where}: plugin {i} is not a JSON object")
        kind = plugin.get("type")
        # The type names an executable in the plugin dirs: a bare file name only.
        if not isinstance(kind, str) or not _NAME.match(kind) or kind in (".", ".."):
            raise CNIFormatError(f"CNI config{where}: plugin {i} type {kind!r} is invalid")
        caps = plugin.get("capabilities", {})
        if not isinstance(caps, dict):
            raise CNIFormatError(f"CNI config{where}: plugin {kind} capabilities must be an "
                                 "object")
    return NetworkConfigList(name=name, cni_version=version,
                             plugins=[dict(p) for p in plugins],
                             disable_check=bool(disable_check), source=source, raw=obj)


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def supports_prev_result_on_del(version: str) -> bool:
    """DEL and CHECK take prevResult (and CHECK exists at all) from spec 0.4.0 on."""
    return version_tuple(version) >= (0, 4, 0)


def runtime_config_for(plugin: Mapping[str, Any],
                       capability_args: Mapping[str, Any]) -> dict[str, Any]:
    """The capability arguments the plugin declares it wants (`capabilities: {x: true}`)."""
    caps = plugin.get("capabilities") or {}
    return {key: value for key, value in capability_args.items() if caps.get(key) is True}


def build_plugin_config(conflist: NetworkConfigList, plugin: Mapping[str, Any],
                        prev_result: Mapping[str, Any] | None,
                        runtime_config: Mapping[str, Any]) -> bytes:
    """The JSON a plugin of the list reads on stdin.

    `runtime_config` holds every capability argument the runtime offers; only those the
    plugin declares are passed, and only when there is at least one (as libcni does).
    """
    conf = dict(plugin)
    conf["name"] = conflist.name
    conf["cniVersion"] = conflist.cni_version
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    wanted = runtime_config_for(plugin, runtime_config)
    if wanted:
        conf["runtimeConfig"] = wanted
    return json.dumps(conf, separators=(",", ":")).encode()


# --- environment --------------------------------------------------------------------------


def valid_container_id(value: str) -> bool:
    return bool(_NAME.match(value)) and len(value) <= 256


def valid_ifname(value: str) -> bool:
    return (0 < len(value) < 16 and value not in (".", "..")
            and not any(c in value for c in "/:") and not any(c.isspace() for c in value))


def build_cni_args(pairs: Sequence[tuple[str, str]]) -> str:
    """`K=V;K=V`; a separator inside a key or value would smuggle in another argument."""
    for key, value in pairs:
        if not key or any(c in key for c in ";=\0") or any(c in value for c in ";\0"):
            raise ValueError(f"CNI argument {key}={value!r} contains a ';', '=' or NUL")
    return ";".join(f"{key}={value}" for key, value in pairs)


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    interface: int | None = None  # index into Result.interfaces


@dataclass(frozen=True)
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: list[str] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    cni_version: str
    interfaces: list[Interface]
    ips: list[IPConfig]
    routes: list[Route]
    dns: DNS
    raw: dict[str, Any] = field(compare=False)  # the plugin's JSON, passed on as prevResult

    def pod_ips(self, ifname: str | None = None) -> list[str]:
        """Addresses (no prefix length) inside the sandbox, IPv4 first, each once.

        IPs tied to a host-side interface (one without `sandbox`) are left out; so are
        those on another sandbox interface than `ifname`, when given.
        """
        seen: list[str] = []
        for ip in sorted(self.ips, key=lambda i: i.address.version):
            if ip.interface is not None and 0 <= ip.interface < len(self.interfaces):
                iface = self.interfaces[ip.interface]
                if not iface.sandbox or (ifname is not None and iface.name != ifname):
                    continue
            text = str(ip.address.ip)
            if text not in seen:
                seen.append(text)
        return seen


def parse_result(data: bytes | str) -> Result:
    """A plugin's ADD output. Raises CNIFormatError naming what is wrong."""
    if not data or not data.strip():
        raise CNIFormatError("the plugin printed no result")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIFormatError(f"the plugin result is not valid JSON: {exc}") from None
    return result_from_dict(obj)


def result_from_dict(obj: Any) -> Result:
    if not isinstance(obj, dict):
        raise CNIFormatError("the plugin result is not a JSON object")
    version = obj.get("cniVersion", "")
    if not isinstance(version, str):
        raise CNIFormatError(f"result cniVersion {version!r} is not a string")
    if version in LEGACY_VERSIONS or (not version and ("ip4" in obj or "ip6" in obj)):
        return _legacy_result(obj, version or "0.2.0")
    if version not in RESULT_VERSIONS:
        raise CNIFormatError(f"result cniVersion {version!r} is not supported "
                             f"(supported: {', '.join(sorted(RESULT_VERSIONS))})")
    interfaces = [_interface(i, item) for i, item in enumerate(_list(obj, "interfaces"))]
    ips = [_ip_config(i, item, version, len(interfaces))
           for i, item in enumerate(_list(obj, "ips"))]
    routes = [_route(i, item) for i, item in enumerate(_list(obj, "routes"))]
    return Result(version, interfaces, ips, routes, _dns(obj.get("dns")), raw=obj)


def _legacy_result(obj: dict[str, Any], version: str) -> Result:
    """0.1.0/0.2.0 `{"ip4": {"ip", "gateway", "routes"}, "ip6": ...}` in the newer form."""
    ips: list[IPConfig] = []
    routes: list[Route] = []
    for key in ("ip4", "ip6"):
        block = obj.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise CNIFormatError(f"result {key} is not an object")
        address = _cidr_interface(block.get("ip"), f"{key}.ip")
        gateway = _address(block["gateway"], f"{key}.gateway") if block.get("gateway") else None
        ips.append(IPConfig(address, gateway))
        routes += [_route(i, r) for i, r in enumerate(_list(block, "routes"))]
    return Result(version, [], ips, routes, _dns(obj.get("dns")), raw=obj)


def _list(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise CNIFormatError(f"result {key} is not a list")
    return value


def _interface(index: int, item: Any) -> Interface:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise CNIFormatError(f"result interfaces[{index}] has no name")
    mac, sandbox = item.get("mac", ""), item.get("sandbox", "")
    if not isinstance(mac, str) or not isinstance(sandbox, str):
        raise CNIFormatError(f"result interfaces[{index}] mac/sandbox must be strings")
    return Interface(item["name"], mac, sandbox)


def _ip_config(index: int, item: Any, version: str, n_interfaces: int) -> IPConfig:
    where = f"ips[{index}]"
    if not isinstance(item, dict):
        raise CNIFormatError(f"result {where} is not an object")
    address = _cidr_interface(item.get("address"), f"{where}.address")
    # 0.3.x/0.4.0 carry the family as "4"/"6" (libcni 1.x leaves it out even there);
    # when present it must agree with the address.
    family = item.get("version")
    if family is not None and version_tuple(version) < (1, 0, 0):
        if family not in ("4", "6"):
            raise CNIFormatError(f"result {where}.version {family!r} must be \"4\" or \"6\"")
        if int(family) != address.version:
            raise CNIFormatError(f"result {where}.version {family} does not match "
                                 f"{address}")
    gateway = None
    if item.get("gateway"):
        gateway = _address(item["gateway"], f"{where}.gateway")
    iface = item.get("interface")
    if iface is not None and (not isinstance(iface, int) or isinstance(iface, bool)
                              or not 0 <= iface < n_interfaces):
        raise CNIFormatError(f"result {where}.interface {iface!r} is not an index into "
                             f"the {n_interfaces} interfaces")
    return IPConfig(address, gateway, iface)


def _route(index: int, item: Any) -> Route:
    where = f"routes[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("dst"), str):
        raise CNIFormatError(f"result {where} has no dst")
    try:
        dst = ipaddress.ip_network(item["dst"], strict=False)
    except ValueError:
        raise CNIFormatError(f"result {where}.dst {item['dst']!r} is not a CIDR") from None
    gw = _address(item["gw"], f"{where}.gw") if item.get("gw") else None
    return Route(dst, gw)


def _dns(value: Any) -> DNS:
    if value is None:
        return DNS()
    if not isinstance(value, dict):
        raise CNIFormatError("result dns is not an object")

    def strings(key: str) -> list[str]:
        items = value.get(key) or []
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise CNIFormatError(f"result dns.{key} is not a list of strings")
        return list(items)

    domain = value.get("domain") or ""
    if not isinstance(domain, str):
        raise CNIFormatError("result dns.domain is not a string")
    return DNS(strings("nameservers"), domain, strings("search"), strings("options"))


def _cidr_interface(value: Any, where: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if not isinstance(value, str) or "/" not in value:
        raise CNIFormatError(f"result {where} {value!r} is not an address in CIDR form")
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise CNIFormatError(f"result {where} {value!r} is not an address in CIDR form") from None


def _address(value: Any, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise CNIFormatError(f"result {where} {value!r} is not an IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise CNIFormatError(f"result {where} {value!r} is not an IP address") from None


# --- errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginError:
    code: int | None  # the spec's well-known code, or None when the plugin gave no JSON
    msg: str
    details: str = ""

    def __str__(self) -> str:
        text = self.msg or "no message"
        if self.details and self.details != self.msg:
            text += f" ({self.details})"
        return f"{text} [code {self.code}]" if self.code is not None else text

    @property
    def is_config_error(self) -> bool:
        return self.code in CONFIG_ERROR_CODES


def parse_error(stdout: bytes, stderr: bytes, exit_code: int | None = None) -> PluginError:
    """What a failed plugin said: the spec's error JSON on stdout (some plugins use
    stderr), else the tail of whatever text it printed."""
    for stream in (stdout, stderr):
        try:
            obj = json.loads(stream)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and ("msg" in obj or "code" in obj):
            code = obj.get("code")
            return PluginError(code if isinstance(code, int) and not isinstance(code, bool)
                               else None,
                               str(obj.get("msg") or ""), str(obj.get("details") or ""))
    text = (stdout.strip() or stderr.strip()).decode(errors="replace")
    if len(text) > 500:
        text = "..." + text[-500:]
    if not text:
        text = f"exited with status {exit_code}" if exit_code is not None else "failed"
    return PluginError(None, text)


def with_pod_cidr(conflist: NetworkConfigList, cidr: str) -> NetworkConfigList:
    """The list with every host-local IPAM allocating from `cidr` (the node's pod CIDR,
    from UpdateRuntimeConfig) instead of the ranges the file names."""
    raw = json.loads(json.dumps(conflist.raw))
    plugins = raw.get("plugins") if "plugins" in raw else [raw]
    for plugin in plugins:
        ipam = plugin.get("ipam") if isinstance(plugin, dict) else None
        if isinstance(ipam, dict) and ipam.get("type") == "host-local":
            ipam.pop("subnet", None)
            ipam["ranges"] = [[{"subnet": cidr}]]
    return config_list_from_dict(raw, conflist.source)
