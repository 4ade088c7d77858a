"""Plugin adjustments and updates: merged across plugins, then applied. Pure logic, no I/O.

Plugins answer CreateContainer with a ContainerAdjustment (and updates of other
containers), UpdateContainer and StopContainer with ContainerUpdates. The answers are
merged in plugin index order, as NRI does:

- every adjustable field (and every key of a keyed field: an annotation, a mount's
  destination, a device's path, an env variable, an rlimit type, a hugepage size, a
  unified key) is owned by the first plugin that sets it; a second plugin setting it
  again is a conflict, and the request fails naming both plugins;
- a plugin may remove an entry by marking its key with a leading '-' (annotations, env,
  mounts, devices); removing gives up the ownership, so a later plugin may set it again;
- OCI hooks only accumulate;
- CDI devices (qualified names, `vendor.com/class=name`) are owned per name and can
  only be added, not removed;
- each plugin sees the container as the plugins before it left it.

`apply_adjustment` then writes the merged adjustment into the OCI spec (a dict as
`cripy.oci.spec` builds it), refusing what this node cannot do with the reason. The
CDI devices are injected last, by `inject_cdi_devices`: the one part that reads files
(the CDI spec directories, host device nodes), so it belongs in a thread.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from cripy.api import api_pb2 as pb
from cripy.errors import CripyError, FailedPreconditionError, InvalidArgumentError
from cripy.nri import api_pb2 as nri
from cripy.oci import cdi
from cripy.oci.spec import order_mounts

REMOVAL_MARK = "-"
_HOOK_KINDS = (("prestart", "prestart"), ("create_runtime", "createRuntime"),
               ("create_container", "createContainer"), ("start_container", "startContainer"),
               ("poststart", "poststart"), ("poststop", "poststop"))
_RLIMIT = re.compile(r"RLIMIT_[A-Z]+")


#: Adjustments the NRI API has that runc on this node cannot apply (refused by name).
UNSUPPORTED_LINUX = {"io_priority": "I/O priority", "scheduler": "scheduling policy",
                     "net_devices": "network devices", "rdt": "RDT settings",
                     "memory_policy": "memory policy"}


def _present(message: Message, name: str) -> bool:
    value = getattr(message, name)
    return message.HasField(name) if isinstance(value, Message) else len(value) > 0


class ConflictError(FailedPreconditionError):
    """Two plugins tried to set the same thing."""


def marked_for_removal(key: str) -> tuple[str, bool]:
    """(the key without its removal mark, whether it had one)."""
    if key.startswith(REMOVAL_MARK):
        return key[len(REMOVAL_MARK):], True
    return key, False


def env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


@dataclass
class Owners:
    """Which plugin set what, per container: (container ID, field, key) -> plugin."""

    claims: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def claim(self, container_id: str, what: str, plugin: str, key: str = "") -> None:
        slot = (container_id, what, key)
        other = self.claims.get(slot)
        if other is not None:
            name = f"{what} {key}" if key else what
            raise ConflictError(f"NRI plugins {other!r} and {plugin!r} both tried to set "
                                f"{name} of container {container_id[:12]}")
        self.claims[slot] = plugin

    def clear(self, container_id: str, what: str, key: str) -> None:
        self.claims.pop((container_id, what, key), None)


# Scalar fields of LinuxResources, by message: (field, what the owner table calls it).
_MEMORY_FIELDS = (("limit", "memory limit"), ("reservation", "memory reservation"),
                  ("swap", "memory swap limit"), ("kernel", "memory kernel limit"),
                  ("kernel_tcp", "memory TCP limit"), ("swappiness", "memory swappiness"),
                  ("disable_oom_killer", "memory OOM killer"),
                  ("use_hierarchy", "memory use_hierarchy"))
_CPU_FIELDS = (("shares", "CPU shares"), ("quota", "CPU quota"), ("period", "CPU period"),
               ("realtime_runtime", "CPU realtime runtime"),
               ("realtime_period", "CPU realtime period"))


def merge_resources(into: nri.LinuxResources, extra: nri.LinuxResources, owners: Owners,
                    container_id: str, plugin: str) -> None:
    """Claim and copy every field `extra` sets into `into`."""
    if extra.HasField("memory"):
        for name, what in _MEMORY_FIELDS:
            if extra.memory.HasField(name):
                owners.claim(container_id, what, plugin)
                getattr(into.memory, name).CopyFrom(getattr(extra.memory, name))
    if extra.HasField("cpu"):
        for name, what in _CPU_FIELDS:
            if extra.cpu.HasField(name):
                owners.claim(container_id, what, plugin)
                getattr(into.cpu, name).CopyFrom(getattr(extra.cpu, name))
        for name, what in (("cpus", "cpuset CPUs"), ("mems", "cpuset memory nodes")):
            value = getattr(extra.cpu, name)
            if value:
                owners.claim(container_id, what, plugin)
                setattr(into.cpu, name, value)
    for limit in extra.hugepage_limits:
        owners.claim(container_id, "hugepage limit", plugin, limit.page_size)
        kept = [h for h in into.hugepage_limits if h.page_size != limit.page_size]
        del into.hugepage_limits[:]
        into.hugepage_limits.extend([*kept, limit])
    for key, value in extra.unified.items():
        owners.claim(container_id, "unified resource", plugin, key)
        into.unified[key] = value
    for name, what in (("blockio_class", "block I/O class"), ("rdt_class", "RDT class"),
                       ("pids", "pids limit")):
        if extra.HasField(name):
            owners.claim(container_id, what, plugin)
            getattr(into, name).CopyFrom(getattr(extra, name))
    if extra.devices:  # device cgroup rules only accumulate, as OCI hooks do
        into.devices.extend(extra.devices)


class CreateResult:
    """The merged answers of the plugins to one CreateContainer."""

    def __init__(self, container: nri.Container) -> None:
        self.container = container  # what the next plugin is shown (adjusted so far)
        self.adjust = nri.ContainerAdjustment()
        self.updates: dict[str, nri.ContainerUpdate] = {}
        self.owners = Owners()

    def apply(self, reply: nri.CreateContainerResponse, plugin: str) -> None:
        if reply.HasField("adjust"):
            self._adjust(reply.adjust, plugin)
        for update in reply.update:
            if update.container_id == self.container.id:
                raise InvalidArgumentError(
                    f"NRI plugin {plugin!r} asked to update container "
                    f"{self.container.id[:12]} while it is being created")
            merge_update(self.updates, update, self.owners, plugin)

    def _adjust(self, adj: nri.ContainerAdjustment, plugin: str) -> None:
        cid, c, out = self.container.id, self.container, self.adjust
        for key in adj.annotations:
            name, removed = marked_for_removal(key)
            if removed:
                self.owners.clear(cid, "annotation", name)
                c.annotations.pop(name, None)
                out.annotations.pop(name, None)
                out.annotations[key] = ""
        for key, value in adj.annotations.items():
            if not marked_for_removal(key)[1]:
                self.owners.claim(cid, "annotation", plugin, key)
                c.annotations[key] = value
                out.annotations.pop(REMOVAL_MARK + key, None)
                out.annotations[key] = value
        self._adjust_mounts(adj.mounts, plugin)
        self._adjust_env(adj.env, plugin)
        for kind, _ in _HOOK_KINDS:
            hooks = getattr(adj.hooks, kind)
            getattr(out.hooks, kind).extend(hooks)
            getattr(c.hooks, kind).extend(hooks)
        if adj.HasField("linux"):
            self._adjust_linux(adj.linux, plugin)
        if adj.args:
            self.owners.claim(cid, "args", plugin)
            del out.args[:], c.args[:]
            out.args.extend(adj.args)
            c.args.extend(adj.args)
        for rlimit in adj.rlimits:
            self.owners.claim(cid, "rlimit", plugin, rlimit.type)
            for rlimits in (out.rlimits, c.rlimits):
                _drop(rlimits, "type", rlimit.type)
                rlimits.append(rlimit)
        self._adjust_cdi(adj.CDI_devices, plugin)

    def _adjust_cdi(self, devices: Any, plugin: str) -> None:
        for device in devices:
            if device.name.startswith(REMOVAL_MARK):
                raise InvalidArgumentError(
                    f"NRI plugin {plugin!r} asked to remove CDI device {device.name[1:]!r}: "
                    "CDI devices can only be added")
            try:
                cdi.parse_qualified_name(device.name)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"NRI plugin {plugin!r}: {exc}") from None
            self.owners.claim(self.container.id, "CDI device", plugin, device.name)
            self.adjust.CDI_devices.append(device)
            if all(d.name != device.name for d in self.container.CDI_devices):
                self.container.CDI_devices.append(device)

    def cdi_requests(self) -> list[tuple[str, list[str]]]:
        """The CDI devices of the merged adjustment by the plugin that asked for them, in
        the order they were asked for."""
        out: dict[str, list[str]] = {}
        for device in self.adjust.CDI_devices:
            plugin = self.owners.claims[(self.container.id, "CDI device", device.name)]
            out.setdefault(plugin, []).append(device.name)
        return list(out.items())

    def _keyed(self, merged: Any, item: Any, attribute: str, what: str, plugin: str
               ) -> bool:
        """Fold one keyed entry (a mount, an env variable, a device) into the merged
        list: claimed, or (marked for removal) given up. True if it is not a removal."""
        raw = getattr(item, attribute)
        key, removed = marked_for_removal(raw)
        if removed:
            self.owners.clear(self.container.id, what, key)
            _drop(merged, attribute, key)
            merged.add(**{attribute: raw})
            return False
        self.owners.claim(self.container.id, what, plugin, key)
        _drop(merged, attribute, REMOVAL_MARK + key)
        merged.append(item)
        return True

    def _adjust_mounts(self, mounts: Any, plugin: str) -> None:
        for mount in mounts:
            _drop(self.container.mounts, "destination",
                  marked_for_removal(mount.destination)[0])
            if self._keyed(self.adjust.mounts, mount, "destination", "mount", plugin):
                self.container.mounts.append(mount)

    def _adjust_env(self, env: Any, plugin: str) -> None:
        c = self.container
        for kv in env:
            key, _ = marked_for_removal(kv.key)
            kept = [e for e in c.env if env_key(e) != key]
            del c.env[:]
            c.env.extend(kept)
            if self._keyed(self.adjust.env, kv, "key", "env", plugin):
                c.env.append(f"{key}={kv.value}")

    def _adjust_linux(self, linux: nri.LinuxContainerAdjustment, plugin: str) -> None:
        cid, c, out = self.container.id, self.container, self.adjust
        for device in linux.devices:
            _drop(c.linux.devices, "path", marked_for_removal(device.path)[0])
            if self._keyed(out.linux.devices, device, "path", "device", plugin):
                c.linux.devices.append(device)
        if linux.HasField("resources"):
            merge_resources(out.linux.resources, linux.resources, self.owners, cid, plugin)
            merge_resources(c.linux.resources, linux.resources, Owners(), cid, plugin)
        if linux.cgroups_path:
            self.owners.claim(cid, "cgroups path", plugin)
            out.linux.cgroups_path = c.linux.cgroups_path = linux.cgroups_path
        if linux.HasField("oom_score_adj"):
            self.owners.claim(cid, "OOM score adjustment", plugin)
            out.linux.oom_score_adj.CopyFrom(linux.oom_score_adj)
            c.linux.oom_score_adj.CopyFrom(linux.oom_score_adj)
        if linux.HasField("seccomp_policy"):
            self.owners.claim(cid, "seccomp policy", plugin)
            out.linux.seccomp_policy.CopyFrom(linux.seccomp_policy)
            c.linux.seccomp_policy.CopyFrom(linux.seccomp_policy)
        for key, value in linux.sysctl.items():
            self.owners.claim(cid, "sysctl", plugin, key)
            out.linux.sysctl[key] = c.linux.sysctl[key] = value
        for ns in linux.namespaces:
            kind, _ = marked_for_removal(ns.type)
            self.owners.claim(cid, "namespace", plugin, kind)
            _drop(out.linux.namespaces, "type", ns.type)
            out.linux.namespaces.append(ns)
        for name, what in UNSUPPORTED_LINUX.items():
            if _present(linux, name):
                self.owners.claim(cid, what, plugin)
                field_value = getattr(out.linux, name)
                if isinstance(field_value, Message):
                    field_value.CopyFrom(getattr(linux, name))
                else:  # a map of messages (net_devices)
                    for key, value in getattr(linux, name).items():
                        field_value[key].CopyFrom(value)


def merge_update(updates: dict[str, nri.ContainerUpdate], update: nri.ContainerUpdate,
                 owners: Owners, plugin: str) -> None:
    """Fold one plugin's update of a container into `updates` (keyed by container ID).

    A conflicting update that asked for ignore_failure is dropped instead of failing."""
    cid = update.container_id
    merged = updates.get(cid)
    trial = nri.ContainerUpdate()
    if merged is not None:
        trial.CopyFrom(merged)
        trial.ignore_failure = merged.ignore_failure and update.ignore_failure
    else:
        trial.container_id = cid
        trial.ignore_failure = update.ignore_failure
    if update.HasField("linux") and update.linux.HasField("resources"):
        claims = dict(owners.claims)
        try:
            merge_resources(trial.linux.resources, update.linux.resources, owners, cid, plugin)
        except ConflictError:
            if not update.ignore_failure:
                raise
            owners.claims = claims
            return
    updates[cid] = trial


def _drop(items: Any, attribute: str, value: str) -> None:
    """Remove from a repeated field the entries whose `attribute` is `value`."""
    kept = [item for item in items if getattr(item, attribute) != value]
    del items[:]
    items.extend(kept)


# --- the OCI spec -----------------------------------------------------------------------


def apply_adjustment(spec: dict[str, Any], adj: nri.ContainerAdjustment, *,
                     cgroup_v2: bool, privileged: bool = False, resctrl: bool = False) -> None:
    """Write a merged adjustment into an OCI spec (in place). `resctrl`: the node has
    the resctrl filesystem RDT classes need."""
    annotations = spec.setdefault("annotations", {})
    for key, value in adj.annotations.items():
        name, removed = marked_for_removal(key)
        if removed:
            annotations.pop(name, None)
        else:
            annotations[key] = value
    process = spec.setdefault("process", {})
    if adj.args:
        process["args"] = list(adj.args)
    _apply_env(process, adj.env)
    _apply_mounts(spec, adj.mounts)
    hooks = spec.setdefault("hooks", {})
    for kind, oci_kind in _HOOK_KINDS:
        for hook in getattr(adj.hooks, kind):
            hooks.setdefault(oci_kind, []).append(hook_to_oci(hook))
    if not any(hooks.values()):
        spec.pop("hooks")
    rlimits = process.setdefault("rlimits", [])
    for rlimit in adj.rlimits:
        if not _RLIMIT.fullmatch(rlimit.type):
            raise InvalidArgumentError(f"NRI rlimit type {rlimit.type!r} is not RLIMIT_*")
        rlimits[:] = [r for r in rlimits if r["type"] != rlimit.type]
        rlimits.append({"type": rlimit.type, "hard": rlimit.hard, "soft": rlimit.soft})
    if not rlimits:
        process.pop("rlimits")
    if adj.HasField("linux"):
        _apply_linux(spec, adj.linux, cgroup_v2=cgroup_v2, privileged=privileged,
                     resctrl=resctrl)


def inject_cdi_devices(spec: dict[str, Any], requests: Sequence[tuple[str, Sequence[str]]],
                       spec_dirs: Sequence[str], *, applied: Sequence[str] = ()) -> None:
    """Resolve the CDI devices plugins asked for (`CreateResult.cdi_requests`) against
    `spec_dirs` and apply them to `spec`, as CreateContainer does for the CRI's. Devices
    in `applied` (the CRI request's, already injected) are not applied again. An error
    keeps its code and names the plugin. Blocking: reads the spec files, stats host
    device nodes."""
    done = list(applied)
    registry: cdi.Registry | None = None
    for plugin, names in requests:
        wanted = [name for name in names if name not in done]
        if not wanted:
            continue
        if registry is None:
            registry = cdi.load(spec_dirs)
        try:
            cdi.apply(spec, registry.resolve(wanted, applied=done))
        except CripyError as exc:
            raise type(exc)(f"NRI plugin {plugin!r}: {exc}") from None
        done += wanted


def _apply_env(process: dict[str, Any], env: Any) -> None:
    current: list[str] = process.setdefault("env", [])
    for kv in env:
        key, removed = marked_for_removal(kv.key)
        if not key or "=" in key:
            raise InvalidArgumentError(f"NRI env variable name {kv.key!r} is invalid")
        current[:] = [e for e in current if env_key(e) != key]
        if not removed:
            current.append(f"{key}={kv.value}")


def _apply_mounts(spec: dict[str, Any], mounts: Any) -> None:
    current: list[dict[str, Any]] = spec.setdefault("mounts", [])
    for mount in mounts:
        dest, removed = marked_for_removal(mount.destination)
        if not dest.startswith("/") or ".." in dest.split("/"):
            raise InvalidArgumentError(
                f"NRI mount destination {mount.destination!r} must be an absolute path "
                "without '..'")
        current[:] = [m for m in current if m.get("destination") != dest]
        if not removed:
            entry: dict[str, Any] = {"destination": dest, "type": mount.type or "bind",
                                     "source": mount.source}
            if mount.options:
                entry["options"] = list(mount.options)
            current.append(entry)
    order_mounts(current)


def hook_to_oci(hook: nri.Hook) -> dict[str, Any]:
    if not hook.path.startswith("/"):
        raise InvalidArgumentError(f"NRI hook path {hook.path!r} must be absolute")
    out: dict[str, Any] = {"path": hook.path}
    if hook.args:
        out["args"] = list(hook.args)
    if hook.env:
        out["env"] = list(hook.env)
    if hook.HasField("timeout"):
        out["timeout"] = hook.timeout.value
    return out


def _apply_linux(spec: dict[str, Any], linux: nri.LinuxContainerAdjustment, *,
                 cgroup_v2: bool, privileged: bool, resctrl: bool) -> None:
    oci = spec.setdefault("linux", {})
    refused = [what for name, what in UNSUPPORTED_LINUX.items() if _present(linux, name)]
    if refused:
        raise FailedPreconditionError(
            f"NRI plugins asked for {', '.join(refused)}: the OCI runtimes cripy runs on "
            "this node cannot apply them")
    if linux.sysctl:
        oci.setdefault("sysctl", {}).update(linux.sysctl)
    for ns in linux.namespaces:
        kind, removed = marked_for_removal(ns.type)
        namespaces = oci.setdefault("namespaces", [])
        namespaces[:] = [n for n in namespaces if n.get("type") != kind]
        if not removed:
            namespaces.append({"type": kind, **({"path": ns.path} if ns.path else {})})
    resources = oci.setdefault("resources", {})
    devices: list[dict[str, Any]] = oci.setdefault("devices", [])
    rules: list[dict[str, Any]] = resources.setdefault("devices", [])
    for device in linux.devices:
        path, removed = marked_for_removal(device.path)
        devices[:] = [d for d in devices if d.get("path") != path]
        if removed:
            continue
        if not path.startswith("/") or device.type not in ("c", "b", "u", "p"):
            raise InvalidArgumentError(
                f"NRI device {device.path!r} (type {device.type!r}) is not an absolute path "
                "of a c, b, u or p device")
        entry: dict[str, Any] = {"path": path, "type": device.type, "major": device.major,
                                 "minor": device.minor}
        if device.HasField("file_mode"):
            entry["fileMode"] = device.file_mode.value
        if device.HasField("uid"):
            entry["uid"] = device.uid.value
        if device.HasField("gid"):
            entry["gid"] = device.gid.value
        devices.append(entry)
        if not privileged and device.type in ("c", "b"):
            rules.append({"allow": True, "type": device.type, "major": device.major,
                          "minor": device.minor, "access": "rwm"})
    if linux.HasField("resources"):
        merge_oci_resources(resources, resources_to_oci(linux.resources, cgroup_v2=cgroup_v2))
        if linux.resources.HasField("rdt_class"):
            if not resctrl:
                raise FailedPreconditionError(
                    f"NRI plugins set RDT class {linux.resources.rdt_class.value!r}: this "
                    "node has no resctrl filesystem (/sys/fs/resctrl)")
            oci["intelRdt"] = {"closID": linux.resources.rdt_class.value}
    if linux.cgroups_path:
        oci["cgroupsPath"] = linux.cgroups_path
    if linux.HasField("oom_score_adj"):
        value = linux.oom_score_adj.value
        if not -1000 <= value <= 1000:
            raise InvalidArgumentError(f"NRI oom_score_adj {value} is not in [-1000, 1000]")
        spec.setdefault("process", {})["oomScoreAdj"] = value
    if linux.HasField("seccomp_policy"):
        oci["seccomp"] = seccomp_to_oci(linux.seccomp_policy)


def resources_to_oci(res: nri.LinuxResources, *, cgroup_v2: bool) -> dict[str, Any]:
    """OCI linux.resources (the parts NRI sets) from NRI LinuxResources. The block I/O
    class needs a class configuration cripy does not have: refused."""
    out: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    if res.HasField("memory"):
        for name, oci_name in (("limit", "limit"), ("reservation", "reservation"),
                               ("swap", "swap"), ("kernel", "kernel"),
                               ("kernel_tcp", "kernelTCP"), ("swappiness", "swappiness"),
                               ("disable_oom_killer", "disableOOMKiller"),
                               ("use_hierarchy", "useHierarchy")):
            if res.memory.HasField(name):
                memory[oci_name] = getattr(res.memory, name).value
    if memory:
        out["memory"] = memory
    cpu: dict[str, Any] = {}
    if res.HasField("cpu"):
        for name, oci_name in (("shares", "shares"), ("quota", "quota"), ("period", "period"),
                               ("realtime_runtime", "realtimeRuntime"),
                               ("realtime_period", "realtimePeriod")):
            if res.cpu.HasField(name):
                cpu[oci_name] = getattr(res.cpu, name).value
        if res.cpu.cpus:
            cpu["cpus"] = res.cpu.cpus
        if res.cpu.mems:
            cpu["mems"] = res.cpu.mems
    if cpu:
        out["cpu"] = cpu
    if res.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit}
                                 for h in res.hugepage_limits]
    if res.unified:
        if not cgroup_v2:
            raise FailedPreconditionError(
                "NRI plugins set unified cgroup resources "
                f"({', '.join(sorted(res.unified))}): they need cgroup v2, this node has v1")
        out["unified"] = dict(res.unified)
    if res.HasField("pids"):
        out["pids"] = {"limit": res.pids.limit}
    rules = []
    for rule in res.devices:
        if rule.type not in ("a", "b", "c"):
            raise InvalidArgumentError(
                f"NRI device cgroup rule type {rule.type!r} is not one of a, b, c")
        entry: dict[str, Any] = {"allow": rule.allow, "type": rule.type,
                                 "access": rule.access or "rwm"}
        for name in ("major", "minor"):  # unset: any
            if rule.HasField(name):
                entry[name] = getattr(rule, name).value
        rules.append(entry)
    if rules:
        out["devices"] = rules
    if res.HasField("blockio_class"):
        raise FailedPreconditionError(
            f"NRI plugins set block I/O class {res.blockio_class.value!r}: cripy has no "
            "block I/O class configuration")
    return out


def merge_oci_resources(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        elif key == "devices":  # rules apply in order: later ones come after
            into[key] = into.get(key, []) + value
        elif key == "hugepageLimits":
            sizes = {h["pageSize"] for h in value}
            into[key] = [h for h in into.get(key, []) if h["pageSize"] not in sizes] + value
        else:
            into[key] = value


def seccomp_to_oci(policy: nri.LinuxSeccomp) -> dict[str, Any]:
    out: dict[str, Any] = {"defaultAction": policy.default_action}
    if policy.HasField("default_errno"):
        out["defaultErrnoRet"] = policy.default_errno.value
    if policy.architectures:
        out["architectures"] = list(policy.architectures)
    if policy.flags:
        out["flags"] = list(policy.flags)
    if policy.listener_path:
        out["listenerPath"] = policy.listener_path
    if policy.listener_metadata:
        out["listenerMetadata"] = policy.listener_metadata
    syscalls = []
    for call in policy.syscalls:
        entry: dict[str, Any] = {"names": list(call.names), "action": call.action}
        if call.HasField("errno_ret"):
            entry["errnoRet"] = call.errno_ret.value
        if call.args:
            entry["args"] = [{"index": a.index, "value": a.value, "valueTwo": a.value_two,
                              "op": a.op} for a in call.args]
        syscalls.append(entry)
    if syscalls:
        out["syscalls"] = syscalls
    return out


# --- container updates: NRI resources onto CRI ones ------------------------------------


#: NRI resource fields with a CRI LinuxContainerResources counterpart (zero: unset).
_CRI_FIELDS = (("memory", "limit", "memory_limit_in_bytes"),
               ("memory", "swap", "memory_swap_limit_in_bytes"),
               ("cpu", "shares", "cpu_shares"), ("cpu", "quota", "cpu_quota"),
               ("cpu", "period", "cpu_period"))


def update_to_cri(current: pb.LinuxContainerResources, res: nri.LinuxResources
                  ) -> pb.LinuxContainerResources:
    """The container's CRI resources with an NRI update on top (the runtime's update path
    takes CRI resources). What CRI updates cannot carry is refused with its name."""
    out = pb.LinuxContainerResources()
    out.CopyFrom(current)
    for group, name, cri_name in _CRI_FIELDS:
        if res.HasField(group) and getattr(res, group).HasField(name):
            setattr(out, cri_name, getattr(getattr(res, group), name).value)
    if res.cpu.cpus:
        out.cpuset_cpus = res.cpu.cpus
    if res.cpu.mems:
        out.cpuset_mems = res.cpu.mems
    unsupported = [what for name, what in _MEMORY_FIELDS[1:]
                   if name != "swap" and res.memory.HasField(name)]
    unsupported += [what for name, what in _CPU_FIELDS[3:] if res.cpu.HasField(name)]
    for limit in res.hugepage_limits:
        kept = [h for h in out.hugepage_limits if h.page_size != limit.page_size]
        del out.hugepage_limits[:]
        out.hugepage_limits.extend(kept)
        out.hugepage_limits.add(page_size=limit.page_size, limit=limit.limit)
    for key, value in res.unified.items():
        out.unified[key] = value
    unsupported += [what for name, what in (("blockio_class", "block I/O class"),
                                            ("rdt_class", "RDT class"), ("pids", "pids limit"))
                    if res.HasField(name)]
    if res.devices:  # nor can NRI's ContainerUpdate carry devices or CDI devices
        unsupported.append("device cgroup rules (devices are set at CreateContainer only)")
    if unsupported:
        raise FailedPreconditionError(
            f"cripy cannot update {', '.join(unsupported)} of a running container")
    return out


def cri_to_nri_resources(res: pb.LinuxContainerResources) -> nri.LinuxResources:
    """A container's CRI resources as NRI shows them to plugins (zero is unset)."""
    out = nri.LinuxResources()
    for group, name, cri_name in _CRI_FIELDS:
        value = getattr(res, cri_name)
        if value:
            getattr(getattr(out, group), name).value = value
    out.cpu.cpus = res.cpuset_cpus
    out.cpu.mems = res.cpuset_mems
    for limit in res.hugepage_limits:
        out.hugepage_limits.add(page_size=limit.page_size, limit=limit.limit)
    out.unified.update(res.unified)
    return out
