"""CNI plugin invocation: ADD, DEL and CHECK of a network config list for a pod.

Behaviour follows libcni as CRI-O and containerd use it:

- the network is the first valid config file in the config dir by name;
- ADD runs the list's plugins in order, each getting the previous result as
  `prevResult`; plugins declaring a capability (e.g. `portMappings`) get it in
  `runtimeConfig`; the `loopback` plugin is run for `lo` first unless the list has it
  or the caller brought `lo` up itself (`lo_is_up`: cripy's pod namespaces come so);
- every pod has a cache file (cache_dir/<pod_id>.json) with the exact config list,
  interface, netns, CNI_ARGS, runtimeConfig and final result. It is written *before*
  the first ADD (without a result) and again after the last, so that DEL after a crash,
  a daemon restart or a config change still runs the plugins that were used, with the
  arguments they saw (portmap's DEL, for one, needs the port mappings again);
- DEL runs the list backwards with the cached result as prevResult; the cache goes away
  only when every DEL succeeded, so a failed teardown can be retried. No cache means
  nothing was set up (or it was torn down already): teardown is then a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cripy.errors import (
    CripyError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from cripy.fsutil import atomic_write_json
from cripy.network.cni_result import (
    CNIFormatError,
    NetworkConfigList,
    Result,
    build_cni_args,
    build_plugin_config,
    config_list_from_dict,
    parse_config_list,
    parse_error,
    parse_result,
    supports_prev_result_on_del,
    valid_container_id,
    valid_ifname,
    with_pod_cidr,
)
from cripy.network.namespaces import is_pinned
from cripy.network.readiness import CONFIG_SUFFIXES

__all__ = ["CNIManager", "NetworkConfigList", "PodNetwork", "PortMapping"]

log = logging.getLogger(__name__)

CACHE_KIND = "cripy-cni-cache/v1"
MAX_STDOUT = 4 << 20  # a result is a few KiB; more means a broken plugin
MAX_STDERR = 64 << 10
# Once a plugin has exited, how long its output pipes may stay open (a child it left
# behind holding them) before we stop reading.
PIPE_GRACE = 1.0
PROTOCOLS = ("tcp", "udp", "sctp")
# What CRI-O's ocicni used for the pod's lo: a one-plugin list of its own.
LOOPBACK = config_list_from_dict(
    {"cniVersion": "0.3.1", "name": "cni-loopback", "plugins": [{"type": "loopback"}]})


@dataclass(frozen=True)
class PortMapping:
    protocol: str  # "tcp" | "udp" | "sctp"
    container_port: int
    host_port: int
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        """The `portMappings` capability entry (the CONVENTIONS.md field names)."""
        entry: dict[str, Any] = {"hostPort": self.host_port,
                                 "containerPort": self.container_port,
                                 "protocol": self.protocol}
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry

    def validate(self) -> None:
        where = f"port mapping {self.host_port}:{self.container_port}/{self.protocol}"
        if self.protocol not in PROTOCOLS:
            raise InvalidArgumentError(f"{where}: protocol must be one of {PROTOCOLS}")
        if not (0 < self.container_port < 65536 and 0 < self.host_port < 65536):
            raise InvalidArgumentError(f"{where}: ports must be within 1-65535")
        if self.host_ip:
            try:
                ipaddress.ip_address(self.host_ip)
            except ValueError:
                raise InvalidArgumentError(
                    f"{where}: host IP {self.host_ip!r} is not an IP address") from None


@dataclass(frozen=True)
class PodNetwork:
    ips: list[str]  # plain addresses, IPv4 first
    interface: str
    result: dict[str, Any]  # the final CNI result, as the last plugin printed it


@dataclass(frozen=True)
class _Call:
    """What stays the same for every plugin of one operation on one pod."""

    container_id: str
    netns: str  # "" when the namespace is gone (DEL only)
    ifname: str
    cni_args: str
    capability_args: Mapping[str, Any]


class CNIManager:
    def __init__(self, config_dir: str, plugin_dirs: list[str], cache_dir: Path,
                 timeout: float = 60) -> None:
        self.config_dir = config_dir
        self.plugin_dirs = list(plugin_dirs)
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self._loaded: tuple[tuple[tuple[str, int, int], ...], NetworkConfigList | None] | None
        self._loaded = None
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.pod_cidr = ""  # from UpdateRuntimeConfig; overrides host-local ranges

    # --- configuration ------------------------------------------------------------------

    def network(self) -> NetworkConfigList | None:
        """The first valid config file in the config dir by name; reloaded when the
        directory's files (names, sizes, mtimes) change."""
        directory = Path(self.config_dir)
        try:
            files = sorted(p for p in directory.iterdir()
                           if p.suffix in CONFIG_SUFFIXES and p.is_file())
            key = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        except OSError:
            files, key = [], ()
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        found = None
        for path in files:
            try:
                found = parse_config_list(path.read_bytes(), str(path))
                break
            except (OSError, CNIFormatError) as exc:
                log.warning("skipping CNI config %s: %s", path, exc)
        self._loaded = (key, found)
        return found

    # --- operations ---------------------------------------------------------------------

    async def setup(self, pod_id: str, netns: Path, *, pod_name: str, pod_namespace: str,
                    pod_uid: str, port_mappings: Sequence[PortMapping] = (),
                    ifname: str = "eth0", lo_is_up: bool = False) -> PodNetwork:
        """ADD the pod to the network; on failure nothing of it is left behind."""
        _check_id(pod_id)
        if not valid_ifname(ifname):
            raise InvalidArgumentError(f"interface name {ifname!r} is not valid")
        for mapping in port_mappings:
            mapping.validate()
        try:
            cni_args = build_cni_args([
                ("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", pod_namespace),
                ("K8S_POD_NAME", pod_name), ("K8S_POD_INFRA_CONTAINER_ID", pod_id),
                ("K8S_POD_UID", pod_uid)])
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        conflist = await asyncio.to_thread(self.network)
        if conflist is None:
            raise FailedPreconditionError(
                f"no valid CNI network configuration in {self.config_dir}")
        if self.pod_cidr:
            conflist = with_pod_cidr(conflist, self.pod_cidr)
        if not is_pinned(netns):
            raise FailedPreconditionError(f"network namespace {netns} does not exist")
        caps: dict[str, Any] = {}
        if port_mappings:
            caps["portMappings"] = [m.to_cni() for m in port_mappings]
        loopback = None if lo_is_up or "loopback" in conflist.plugin_types else LOOPBACK
        call = _Call(pod_id, str(netns), ifname, cni_args, caps)

        async with self._locked(pod_id):
            if self._cache_path(pod_id).exists():
                # An earlier setup that was never torn down (a crash, a retry): the spec
                # forbids a second ADD without a DEL in between.
                log.info("pod %s: tearing down a previous network setup first", pod_id[:12])
                await self._teardown_locked(pod_id, netns)
            entry: dict[str, Any] = {
                "kind": CACHE_KIND, "containerId": pod_id, "config": conflist.raw,
                "ifName": ifname, "netns": str(netns), "cniArgs": cni_args,
                "runtimeConfig": caps, "loopback": loopback.raw if loopback else None,
                "result": None,
            }
            await self._write_cache(pod_id, entry)
            try:
                if loopback is not None:
                    await self._add_list(loopback, _Call(pod_id, str(netns), "lo", cni_args,
                                                         {}))
                result = await self._add_list(conflist, call)
            except BaseException as exc:
                log.warning("pod %s: CNI ADD failed, undoing: %s", pod_id[:12], exc)
                hung = exc.plugin if isinstance(exc, _PluginTimeout) else None
                await self._rollback(conflist, loopback, call, hung)
                await asyncio.to_thread(self._remove_cache, pod_id)
                raise
            entry["result"] = result.raw
            try:
                await self._write_cache(pod_id, entry)
            except BaseException:
                await self._rollback(conflist, loopback, call, None)
                await asyncio.to_thread(self._remove_cache, pod_id)
                raise
        ips = result.pod_ips(ifname)
        log.info("pod %s: network %s set up, IPs %s", pod_id[:12], conflist.name,
                 ", ".join(ips) or "none")
        return PodNetwork(ips=ips, interface=ifname, result=result.raw)

    async def teardown(self, pod_id: str, netns: Path | None) -> None:
        """DEL the pod from the network it was added to; idempotent.

        A namespace that is gone (None, or no longer a namespace) still gets DEL, with
        CNI_NETNS empty, so IPAM releases the address and host rules are removed.
        """
        _check_id(pod_id)
        async with self._locked(pod_id):
            await self._teardown_locked(pod_id, netns)

    async def check(self, pod_id: str, netns: Path) -> None:
        """CHECK the pod's network with the cached result; raises when it is broken."""
        _check_id(pod_id)
        async with self._locked(pod_id):
            entry = await asyncio.to_thread(self._read_cache, pod_id)
            if entry is None or entry.get("result") is None:
                raise FailedPreconditionError(f"pod {pod_id} has no network set up")
            if not is_pinned(netns):
                raise FailedPreconditionError(f"network namespace {netns} does not exist")
            conflist = config_list_from_dict(entry["config"], f"cache of pod {pod_id}")
            if conflist.disable_check or not supports_prev_result_on_del(conflist.cni_version):
                return  # CHECK does not exist before 0.4.0; disableCheck forbids it
            call = _Call(pod_id, str(netns), entry["ifName"], entry["cniArgs"],
                         entry.get("runtimeConfig") or {})
            for plugin in conflist.plugins:
                await self._invoke(conflist, plugin, "CHECK", call, entry["result"])

    # --- internals ----------------------------------------------------------------------

    async def _teardown_locked(self, pod_id: str, netns: Path | None) -> None:
        entry = await asyncio.to_thread(self._read_cache, pod_id)
        if entry is None:
            if not (self.cache_dir / f"{pod_id}.json").exists():
                return  # never set up, or already torn down
            # A cache we cannot read: DEL with the current config is the best left.
            conflist = await asyncio.to_thread(self.network)
            if conflist is None:
                log.warning("pod %s: unreadable CNI cache and no network config; "
                            "dropping the cache", pod_id[:12])
                await asyncio.to_thread(self._remove_cache, pod_id)
                return
            loopback = None if "loopback" in conflist.plugin_types else LOOPBACK
            cni_args = build_cni_args([("IgnoreUnknown", "1"),
                                       ("K8S_POD_INFRA_CONTAINER_ID", pod_id)])
            ifname = "eth0"
            caps: Mapping[str, Any] = {}
            prev: dict[str, Any] | None = None
        else:
            conflist = config_list_from_dict(entry["config"], f"cache of pod {pod_id}")
            loopback = (config_list_from_dict(entry["loopback"])
                        if entry.get("loopback") else None)
            ifname, cni_args = entry["ifName"], entry["cniArgs"]
            caps, prev = entry.get("runtimeConfig") or {}, entry.get("result")
            if netns is None and entry.get("netns"):
                netns = Path(entry["netns"])  # still there? then DEL cleans inside it too
        live = str(netns) if netns is not None and is_pinned(netns) else ""
        errors = await self._del_all(conflist, loopback,
                                     _Call(pod_id, live, ifname, cni_args, caps), prev, None)
        if errors:  # the cache stays, so that a retry DELs with the same arguments
            for exc in errors[1:]:
                log.warning("pod %s: CNI teardown: %s", pod_id[:12], exc)
            raise errors[0]
        await asyncio.to_thread(self._remove_cache, pod_id)
        log.info("pod %s: network %s torn down", pod_id[:12], conflist.name)

    async def _add_list(self, conflist: NetworkConfigList, call: _Call) -> Result:
        prev: dict[str, Any] | None = None
        result: Result | None = None
        for index, plugin in enumerate(conflist.plugins):
            try:
                out = await self._invoke(conflist, plugin, "ADD", call, prev)
            except _PluginTimeout as exc:
                raise _PluginTimeout(str(exc), (conflist.name, index)) from None
            try:
                result = parse_result(out)
            except CNIFormatError as exc:
                raise UnavailableError(
                    f"CNI plugin {plugin['type']} ADD (network {conflist.name}) printed an "
                    f"invalid result: {exc}") from None
            prev = result.raw
        assert result is not None  # a list has at least one plugin
        return result

    async def _rollback(self, conflist: NetworkConfigList, loopback: NetworkConfigList | None,
                        call: _Call, hung: tuple[str, int] | None) -> None:
        """DEL every plugin of the list, as the spec asks after a failed ADD, except one
        that already hung (it would only hang again); errors are logged, not raised."""
        errors = await self._del_all(conflist, loopback, call, None, hung)
        for exc in errors:
            log.warning("pod %s: undoing a failed CNI ADD: %s", call.container_id[:12], exc)

    async def _del_all(self, conflist: NetworkConfigList, loopback: NetworkConfigList | None,
                       call: _Call, prev: dict[str, Any] | None,
                       hung: tuple[str, int] | None) -> list[CripyError]:
        """DEL the list backwards, then the loopback; every plugin is tried."""
        errors: list[CripyError] = []
        use_prev = prev if supports_prev_result_on_del(conflist.cni_version) else None
        steps = [(conflist, i, plugin, call, use_prev)
                 for i, plugin in reversed(list(enumerate(conflist.plugins)))]
        if loopback is not None:
            lo_call = _Call(call.container_id, call.netns, "lo", call.cni_args, {})
            steps += [(loopback, i, plugin, lo_call, None)
                      for i, plugin in reversed(list(enumerate(loopback.plugins)))]
        for net, index, plugin, step_call, step_prev in steps:
            if hung == (net.name, index):
                continue
            try:
                await self._invoke(net, plugin, "DEL", step_call, step_prev)
            except CripyError as exc:
                errors.append(exc)
        return errors

    async def _invoke(self, conflist: NetworkConfigList, plugin: Mapping[str, Any],
                      command: str, call: _Call, prev: Mapping[str, Any] | None) -> bytes:
        kind = str(plugin["type"])
        what = f"CNI plugin {kind} {command} (network {conflist.name})"
        path = self._find_plugin(kind)
        stdin = build_plugin_config(conflist, plugin, prev, call.capability_args)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(CNI_COMMAND=command, CNI_CONTAINERID=call.container_id,
                   CNI_NETNS=call.netns, CNI_IFNAME=call.ifname, CNI_ARGS=call.cni_args,
                   CNI_PATH=":".join(self.plugin_dirs))
        try:
            code, out, err, too_big = await _run(path, stdin, env, self.timeout)
        except TimeoutError:
            raise _PluginTimeout(f"{what} did not finish within {self.timeout:g}s and was "
                                 "killed", None) from None
        except OSError as exc:
            raise FailedPreconditionError(f"{what}: cannot run {path}: {exc}") from None
        if code != 0:
            failure = parse_error(out, err, code)
            cls = FailedPreconditionError if failure.is_config_error else UnavailableError
            raise cls(f"{what} failed: {failure}")
        if too_big:
            raise UnavailableError(f"{what} printed more than {MAX_STDOUT} bytes")
        if err.strip():
            log.debug("%s stderr: %s", what, err.decode(errors="replace").strip())
        return out

    def _find_plugin(self, kind: str) -> str:
        for directory in self.plugin_dirs:
            candidate = Path(directory) / kind
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        raise FailedPreconditionError(
            f"CNI plugin {kind!r} not found in {', '.join(self.plugin_dirs)}")

    @contextlib.asynccontextmanager
    async def _locked(self, pod_id: str) -> AsyncIterator[None]:
        """One operation at a time per pod (the spec forbids parallel ones)."""
        lock, users = self._locks.get(pod_id, (asyncio.Lock(), 0))
        self._locks[pod_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[pod_id]
            if users == 1:
                del self._locks[pod_id]
            else:
                self._locks[pod_id] = (lock, users - 1)

    # --- the cache ----------------------------------------------------------------------

    def _cache_path(self, pod_id: str) -> Path:
        return self.cache_dir / f"{pod_id}.json"

    def _read_cache(self, pod_id: str) -> dict[str, Any] | None:
        """The pod's cache entry; None when missing or unreadable (logged)."""
        path = self._cache_path(pod_id)
        try:
            entry = json.loads(path.read_bytes())
            if not (isinstance(entry, dict) and entry.get("kind") == CACHE_KIND
                    and entry.get("containerId") == pod_id
                    and isinstance(entry.get("ifName"), str)
                    and isinstance(entry.get("cniArgs"), str)
                    and isinstance(entry.get("runtimeConfig") or {}, dict)
                    and isinstance(entry.get("result") or {}, dict)):
                raise ValueError("not a cripy CNI cache entry for this pod")
            config_list_from_dict(entry.get("config"))
            if entry.get("loopback") is not None:
                config_list_from_dict(entry["loopback"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("CNI cache %s is unreadable: %s", path, exc)
            return None
        return entry

    async def _write_cache(self, pod_id: str, entry: dict[str, Any]) -> None:
        def write() -> None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._cache_path(pod_id), entry)
        await asyncio.to_thread(write)

    def _remove_cache(self, pod_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._cache_path(pod_id).unlink()


class _PluginTimeout(DeadlineExceededError):
    def __init__(self, message: str, plugin: tuple[str, int] | None) -> None:
        super().__init__(message)
        self.plugin = plugin  # (network name, plugin index) of the plugin that hung


def _check_id(pod_id: str) -> None:
    # Also what keeps the cache file name inside the cache dir.
    if not valid_container_id(pod_id):
        raise InvalidArgumentError(f"pod ID {pod_id!r} is not a valid CNI container ID")


async def _run(path: str, stdin: bytes, env: dict[str, str],
               timeout: float) -> tuple[int, bytes, bytes, bool]:
    """Run a plugin: (exit code, stdout, stderr (capped), stdout overflowed).

    The plugin leads its own process group so that on timeout or cancellation it is
    killed together with whatever it started (an IPAM plugin, iptables).
    """
    proc = await asyncio.create_subprocess_exec(
        path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd="/", start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    readers = [asyncio.ensure_future(_read_capped(proc.stdout, MAX_STDOUT)),
               asyncio.ensure_future(_read_capped(proc.stderr, MAX_STDERR))]
    try:
        async with asyncio.timeout(timeout):
            try:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it exited without reading: its exit code tells the rest
            finally:
                proc.stdin.close()
            code = await proc.wait()
            done, pending = await asyncio.wait(readers, timeout=PIPE_GRACE)
    except BaseException:
        _kill_group(proc.pid)
        for reader in readers:
            reader.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(proc.wait())
        raise
    if pending:  # a child the plugin left behind still holds the pipes
        _kill_group(proc.pid)
        for reader in pending:
            reader.cancel()
    out, too_big = readers[0].result() if readers[0] in done else (b"", False)
    err, _ = readers[1].result() if readers[1] in done else (b"", False)
    return code, out, err, too_big


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Everything up to `limit` bytes; the rest is drained (so the writer never blocks)
    and only flagged."""
    kept = bytearray()
    over = False
    while chunk := await stream.read(65536):
        room = limit - len(kept)
        if len(chunk) > room:
            over = True
        kept += chunk[:max(room, 0)]
    return bytes(kept), over


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
