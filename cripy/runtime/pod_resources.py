"""Pod-level resources: the pod's overhead plus the sum of its containers' resources
(LinuxPodSandboxConfig.overhead / .resources at RunPodSandbox, and
UpdatePodSandboxResources later), applied to the pod's own cgroup.

The kubelet sends the fields it sets on its pod cgroups: cpu_shares, cpu_quota,
cpu_period and memory_limit_in_bytes. The pod cgroup gets resources + overhead, as the
kubelet sizes it: no memory or CPU limit when the containers together have none.

- cgroupfs, v1: memory.limit_in_bytes, cpu.cfs_period_us / cpu.cfs_quota_us, cpu.shares
  in the pod's directory of each controller;
- cgroupfs, v2: memory.max, cpu.max, cpu.weight (the controllers are enabled along the
  way, as runc does for container cgroups);
- systemd: the slice's MemoryMax, CPUQuota / CPUQuotaPeriodSec and CPUWeight (CPUShares
  on v1), set with `systemctl set-property --runtime`, so systemd keeps them.

A pod without a cgroup of its own (the driver's default parent, or one other pods share)
cannot get pod-level limits: asking for them is refused.

Only with `[runtime] pod_cgroup_resources = true`: the kubelet writes its pod cgroups
itself before RunPodSandbox and before UpdatePodSandboxResources, and the sum it sends
leaves out containers without a limit (where its own pod cgroup has none), so by default
the values are checked and recorded only, as CRI-O and containerd treat them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.oci.cgroups import CGROUP_ROOT, SystemdDriver
from cripy.runtime.store import PodState, Sandbox
from cripy.runtime.usage import _pod_cgroup

if TYPE_CHECKING:
    from cripy.runtime.sandbox import SandboxManager

log = logging.getLogger(__name__)

DEFAULT_PERIOD = 100_000  # us, the kernel's and the kubelet's
MIN_SHARES, MAX_SHARES = 2, 262_144
MIN_PERIOD, MAX_PERIOD = 1_000, 1_000_000
MIN_QUOTA = 1_000
#: v2 controllers the pod cgroup's limits need
_V2_CONTROLLERS = ("cpu", "memory")
_V1_CPU = ("cpu,cpuacct", "cpu", "cpuacct,cpu")


@dataclass(frozen=True)
class PodLimits:
    memory: int | None  # bytes; None: no limit
    cpu_quota: int | None  # us per period; None: no limit
    cpu_period: int  # us
    cpu_shares: int | None  # None: left as it is


def cpu_weight(shares: int) -> int:
    """cgroup v2 cpu.weight of v1 cpu.shares, as runc and systemd convert them."""
    return 1 + ((shares - 2) * 9999) // 262_142


def _check(res: pb.LinuxContainerResources, what: str) -> None:
    unsupported = [name for name, value in (
        ("oom_score_adj", res.oom_score_adj), ("cpuset_cpus", res.cpuset_cpus),
        ("cpuset_mems", res.cpuset_mems), ("hugepage_limits", len(res.hugepage_limits)),
        ("unified", len(res.unified)),
        ("memory_swap_limit_in_bytes", res.memory_swap_limit_in_bytes)) if value]
    if unsupported:
        raise InvalidArgumentError(
            f"pod {what}: {', '.join(unsupported)} cannot be set for a pod; pod-level "
            "resources are cpu_shares, cpu_quota, cpu_period and memory_limit_in_bytes")
    if res.memory_limit_in_bytes < 0:
        raise InvalidArgumentError(
            f"pod {what}: memory_limit_in_bytes {res.memory_limit_in_bytes} is negative")
    if res.cpu_shares and not MIN_SHARES <= res.cpu_shares <= MAX_SHARES:
        raise InvalidArgumentError(
            f"pod {what}: cpu_shares {res.cpu_shares} is outside {MIN_SHARES}..{MAX_SHARES}")
    if res.cpu_period and not MIN_PERIOD <= res.cpu_period <= MAX_PERIOD:
        raise InvalidArgumentError(
            f"pod {what}: cpu_period {res.cpu_period} is outside {MIN_PERIOD}..{MAX_PERIOD} us")
    if res.cpu_quota < -1 or 0 < res.cpu_quota < MIN_QUOTA:
        raise InvalidArgumentError(
            f"pod {what}: cpu_quota {res.cpu_quota} must be -1, 0 or at least {MIN_QUOTA} us")


def pod_limits(resources: pb.LinuxContainerResources,
               overhead: pb.LinuxContainerResources) -> PodLimits | None:
    """The pod cgroup's limits, or None when neither message asks for anything.
    Raises InvalidArgumentError for values no cgroup takes."""
    _check(resources, "resources")
    _check(overhead, "overhead")
    if resources == pb.LinuxContainerResources() and overhead == pb.LinuxContainerResources():
        return None
    period = resources.cpu_period or overhead.cpu_period or DEFAULT_PERIOD
    quota = None
    if resources.cpu_quota > 0:
        extra = max(overhead.cpu_quota, 0) * period // (overhead.cpu_period or DEFAULT_PERIOD)
        quota = resources.cpu_quota + extra
    shares = resources.cpu_shares + overhead.cpu_shares
    memory = None
    if resources.memory_limit_in_bytes > 0:
        memory = resources.memory_limit_in_bytes + overhead.memory_limit_in_bytes
    return PodLimits(memory=memory, cpu_quota=quota, cpu_period=period,
                     cpu_shares=min(max(shares, MIN_SHARES), MAX_SHARES) if shares else None)


# --- cgroupfs (blocking) ------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EBUSY:
            reason += " (the pod uses more than that now)"
        raise FailedPreconditionError(f"writing {value!r} to {path}: {reason}") from None


def apply_cgroupfs(pod_dir: str, limits: PodLimits, root: Path = CGROUP_ROOT) -> None:
    """Write `limits` into the pod's cgroup ("/a/b" below `root`), making it if needed."""
    relative = Path(*[p for p in pod_dir.split("/") if p])
    if (root / "cgroup.controllers").exists():
        _apply_v2(root, relative, limits)
    else:
        _apply_v1(root, relative, limits)


def _apply_v2(root: Path, relative: Path, limits: PodLimits) -> None:
    directory = root
    for part in relative.parts:  # each level lets its children use cpu and memory
        available = (directory / "cgroup.controllers").read_text().split()
        enabled = (directory / "cgroup.subtree_control").read_text().split()
        wanted = [c for c in _V2_CONTROLLERS if c in available and c not in enabled]
        if wanted:
            _write(directory / "cgroup.subtree_control", " ".join("+" + c for c in wanted))
        directory = directory / part
        directory.mkdir(exist_ok=True)
    _write(directory / "memory.max", str(limits.memory) if limits.memory else "max")
    quota = str(limits.cpu_quota) if limits.cpu_quota else "max"
    _write(directory / "cpu.max", f"{quota} {limits.cpu_period}")
    if limits.cpu_shares is not None:
        _write(directory / "cpu.weight", str(cpu_weight(limits.cpu_shares)))


def _apply_v1(root: Path, relative: Path, limits: PodLimits) -> None:
    memory = root / "memory" / relative
    memory.mkdir(parents=True, exist_ok=True)
    _write(memory / "memory.limit_in_bytes", str(limits.memory) if limits.memory else "-1")
    mount = next((root / c for c in _V1_CPU if (root / c).is_dir() and
                  not (root / c).is_symlink()), root / "cpu")
    cpu = mount / relative
    cpu.mkdir(parents=True, exist_ok=True)
    _write(cpu / "cpu.cfs_quota_us", "-1")  # first, so any period is accepted
    _write(cpu / "cpu.cfs_period_us", str(limits.cpu_period))
    if limits.cpu_quota:
        _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota))
    if limits.cpu_shares is not None:
        _write(cpu / "cpu.shares", str(limits.cpu_shares))


# --- systemd ------------------------------------------------------------------------------


def systemd_properties(limits: PodLimits, cgroup_v2: bool) -> list[str]:
    """`systemctl set-property` assignments of `limits`."""
    props = [f"MemoryMax={limits.memory if limits.memory else 'infinity'}",
             f"CPUQuotaPeriodSec={limits.cpu_period}us"]
    if limits.cpu_quota:  # percent of one CPU, to a hundredth (what systemd keeps)
        props.append(f"CPUQuota={limits.cpu_quota * 100 / limits.cpu_period:.2f}%")
    else:
        props.append("CPUQuota=")  # empty: no quota
    if limits.cpu_shares is not None:
        props.append(f"CPUWeight={cpu_weight(limits.cpu_shares)}" if cgroup_v2
                     else f"CPUShares={limits.cpu_shares}")
    return props


# --- the pod ------------------------------------------------------------------------------


async def apply(sandboxes: SandboxManager, sandbox: Sandbox,
                resources: pb.LinuxContainerResources,
                overhead: pb.LinuxContainerResources) -> bool:
    """Apply the pod-level resources to the pod's cgroup; False when there are none, or
    when the configuration leaves the pod cgroup to the kubelet."""
    limits = pod_limits(resources, overhead)
    if limits is None or not sandboxes.config.runtime.pod_cgroup_resources:
        return False
    parent = sandbox.config.linux.cgroup_parent
    driver = sandboxes.oci.cgroups
    pod_dir = _pod_cgroup(sandbox, sandboxes)
    if pod_dir is None:
        raise FailedPreconditionError(
            f"pod-level resources need a cgroup of the pod's own, and cgroup_parent "
            f"{parent or '(none: the default)'!r:.120} is "
            f"{'the default one' if not parent else 'shared with other pods'}")
    if isinstance(driver, SystemdDriver):
        unit = driver.parent(parent)
        await driver.set_properties(unit, systemd_properties(limits, driver.cgroup_v2))
    else:
        await asyncio.to_thread(apply_cgroupfs, pod_dir, limits)
    log.info("pod %s: cgroup %s limited to %s", sandbox.id[:12], pod_dir, limits)
    return True


async def update(sandboxes: SandboxManager, sandbox_id: str,
                 overhead: pb.LinuxContainerResources,
                 resources: pb.LinuxContainerResources) -> None:
    """UpdatePodSandboxResources: apply, then record the pod's new overhead and resources."""
    sandbox = sandboxes.get(sandbox_id)
    pod_limits(resources, overhead)  # bad values are refused before anything happens
    async with sandboxes.locks.hold(sandbox.id):
        current = sandboxes.find(sandbox.id)
        if current is None or current.state != PodState.READY:
            raise FailedPreconditionError(f"pod sandbox {sandbox.id[:12]} is not ready")
        await apply(sandboxes, current, resources, overhead)
        config = pb.PodSandboxConfig()
        config.CopyFrom(current.config)
        config.linux.overhead.CopyFrom(overhead)
        config.linux.resources.CopyFrom(resources)
        await sandboxes.store.set(current.id, config=config)
