"""Seccomp profiles: the built-in default, node-local profiles, and conversion to OCI form.

Profiles are written in the docker-style format (the one kubelet users know): the OCI
`linux.seccomp` fields plus `archMap` (an architecture with its sub-architectures) and,
per syscall rule, `includes` / `excludes` conditions on the container's capabilities, the
host architecture (Go names: amd64, arm64, ...) and the kernel version. Conversion
evaluates those conditions once, for one container on this host, and emits plain OCI.

A localhost profile is node configuration, but it is still parsed defensively: size cap,
strict types, known actions / operators / architectures only, so a broken file becomes an
InvalidArgumentError naming the problem instead of a runc failure or a daemon crash.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import stat
from collections.abc import Collection
from importlib import resources
from typing import Any

from cripy.errors import InvalidArgumentError, NotFoundError

MAX_PROFILE_SIZE = 1 << 20
_MAX_RULES = 10_000

ACTIONS = frozenset(
    {
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_TRAP",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_TRACE",
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_LOG",
        "SCMP_ACT_NOTIFY",
    }
)
_ERRNO_ACTIONS = frozenset({"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"})
OPERATORS = frozenset(
    {
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    }
)
ARCHITECTURES = frozenset(
    {
        "SCMP_ARCH_X86",
        "SCMP_ARCH_X86_64",
        "SCMP_ARCH_X32",
        "SCMP_ARCH_ARM",
        "SCMP_ARCH_AARCH64",
        "SCMP_ARCH_MIPS",
        "SCMP_ARCH_MIPS64",
        "SCMP_ARCH_MIPS64N32",
        "SCMP_ARCH_MIPSEL",
        "SCMP_ARCH_MIPSEL64",
        "SCMP_ARCH_MIPSEL64N32",
        "SCMP_ARCH_PPC",
        "SCMP_ARCH_PPC64",
        "SCMP_ARCH_PPC64LE",
        "SCMP_ARCH_S390",
        "SCMP_ARCH_S390X",
        "SCMP_ARCH_PARISC",
        "SCMP_ARCH_PARISC64",
        "SCMP_ARCH_RISCV64",
    }
)
FLAGS = frozenset(
    {
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    }
)
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1
_SYSCALL_NAME = re.compile(r"[a-z0-9_]{1,64}")
_KERNEL_VERSION = re.compile(r"(\d+)\.(\d+)")

# uname machine -> (libseccomp native arch, Go GOARCH used by includes/excludes "arches").
_MACHINES: dict[str, tuple[str, str]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "amd64": ("SCMP_ARCH_X86_64", "amd64"),
    "i386": ("SCMP_ARCH_X86", "386"),
    "i686": ("SCMP_ARCH_X86", "386"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "arm64": ("SCMP_ARCH_AARCH64", "arm64"),
    "armv7l": ("SCMP_ARCH_ARM", "arm"),
    "armv6l": ("SCMP_ARCH_ARM", "arm"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
}


@functools.lru_cache(maxsize=1)
def _default_profile_text() -> str:
    return resources.files("cripy.oci").joinpath("seccomp_default.json").read_text("utf-8")


def default_profile() -> dict[str, Any]:
    """The project's default (docker-style) profile, a fresh copy each call."""
    value = json.loads(_default_profile_text())
    assert isinstance(value, dict)
    return value


def host_arch() -> tuple[str, str]:
    """(libseccomp arch, Go arch) of this machine; unknown machines get ("", machine)."""
    machine = platform.machine()
    return _MACHINES.get(machine, ("", machine))


def host_kernel() -> tuple[int, int]:
    m = _KERNEL_VERSION.match(platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def load_localhost_profile(path: str) -> dict[str, Any]:
    """Read and validate a node-local profile; returns it still in docker-style form."""
    if not path or not path.startswith("/") or "\x00" in path:
        raise InvalidArgumentError(f"seccomp localhost profile '{path}' must be an absolute path")
    if ".." in path.split("/"):
        raise InvalidArgumentError(f"seccomp localhost profile '{path}' must not contain '..'")
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the daemon in open().
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFoundError(f"seccomp localhost profile '{path}' not found") from None
    except OSError as e:
        raise InvalidArgumentError(
            f"seccomp localhost profile '{path}' cannot be opened: {e.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError(f"seccomp localhost profile '{path}' is not a regular file")
        if st.st_size > MAX_PROFILE_SIZE:
            raise InvalidArgumentError(
                f"seccomp localhost profile '{path}' is larger than {MAX_PROFILE_SIZE} bytes"
            )
        data = _read_at_most(fd, MAX_PROFILE_SIZE + 1)
    except OSError as e:
        raise InvalidArgumentError(
            f"seccomp localhost profile '{path}' cannot be read: {e.strerror}"
        ) from None
    finally:
        os.close(fd)
    if len(data) > MAX_PROFILE_SIZE:
        raise InvalidArgumentError(
            f"seccomp localhost profile '{path}' is larger than {MAX_PROFILE_SIZE} bytes"
        )
    return parse_profile(data, source=f"seccomp localhost profile '{path}'")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(65536, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def parse_profile(data: bytes | str, source: str = "seccomp profile") -> dict[str, Any]:
    """Parse JSON and check the structure; raises InvalidArgumentError naming `source`."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise InvalidArgumentError(f"{source} is not valid JSON: {e}") from None
    _validate(value, source)
    assert isinstance(value, dict)
    return value


def _fail(source: str, what: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{source}: {what}")


def _uint(value: Any, limit: int) -> bool:
    # bool is an int subclass in Python; JSON true is not a number here.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _validate(p: Any, source: str) -> None:
    if not isinstance(p, dict):
        raise _fail(source, "the profile must be a JSON object")
    if p.get("defaultAction") not in ACTIONS:
        raise _fail(source, f"unknown defaultAction {p.get('defaultAction')!r}")
    if "defaultErrnoRet" in p and p["defaultErrnoRet"] is not None:
        if not _uint(p["defaultErrnoRet"], _U32_MAX):
            raise _fail(source, f"invalid defaultErrnoRet {p['defaultErrnoRet']!r}")
        if p["defaultAction"] not in _ERRNO_ACTIONS:
            raise _fail(source, "defaultErrnoRet is only valid with SCMP_ACT_ERRNO or TRACE")
    arches = p.get("architectures")
    arch_map = p.get("archMap")
    if arches and arch_map:
        raise _fail(source, "use either 'architectures' or 'archMap', not both")
    if arches is not None:
        if not _str_list(arches):
            raise _fail(source, "architectures must be a list of strings")
        for a in arches:
            if a not in ARCHITECTURES:
                raise _fail(source, f"unknown architecture {a!r}")
    if arch_map is not None:
        if not isinstance(arch_map, list):
            raise _fail(source, "archMap must be a list")
        for entry in arch_map:
            if not isinstance(entry, dict) or entry.get("architecture") not in ARCHITECTURES:
                raise _fail(source, f"invalid archMap entry {entry!r:.100}")
            subs = entry.get("subArchitectures") or []
            if not _str_list(subs) or any(s not in ARCHITECTURES for s in subs):
                raise _fail(source, f"invalid subArchitectures in {entry!r:.100}")
    flags = p.get("flags")
    if flags is not None and (not _str_list(flags) or any(f not in FLAGS for f in flags)):
        raise _fail(source, f"invalid flags {flags!r:.100}")
    for key in ("listenerPath", "listenerMetadata"):
        if key in p and p[key] is not None and not isinstance(p[key], str):
            raise _fail(source, f"{key} must be a string")
    syscalls = p.get("syscalls")
    if syscalls is None:
        return
    if not isinstance(syscalls, list):
        raise _fail(source, "syscalls must be a list")
    if len(syscalls) > _MAX_RULES:
        raise _fail(source, f"more than {_MAX_RULES} syscall rules")
    uses_notify = p["defaultAction"] == "SCMP_ACT_NOTIFY"
    for i, rule in enumerate(syscalls):
        _validate_rule(rule, f"{source}: syscalls[{i}]")
        uses_notify = uses_notify or rule["action"] == "SCMP_ACT_NOTIFY"
    if uses_notify and not p.get("listenerPath"):
        raise _fail(source, "SCMP_ACT_NOTIFY needs a listenerPath")


def _validate_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, dict):
        raise InvalidArgumentError(f"{where} must be an object")
    names = rule.get("names")
    name = rule.get("name")  # the old single-name form
    if names is None and name is None:
        raise InvalidArgumentError(f"{where} has no names")
    if names is not None and name is not None:
        raise InvalidArgumentError(f"{where} has both 'name' and 'names'")
    all_names = [name] if names is None else names
    if not _str_list(all_names) or not all_names:
        raise InvalidArgumentError(f"{where}: names must be a non-empty list of strings")
    for n in all_names:
        if not isinstance(n, str) or not _SYSCALL_NAME.fullmatch(n):
            raise InvalidArgumentError(f"{where}: invalid syscall name {n!r:.80}")
    action = rule.get("action")
    if action not in ACTIONS:
        raise InvalidArgumentError(f"{where}: unknown action {action!r:.80}")
    if rule.get("errnoRet") is not None:
        if not _uint(rule["errnoRet"], _U32_MAX):
            raise InvalidArgumentError(f"{where}: invalid errnoRet {rule['errnoRet']!r:.80}")
        if action not in _ERRNO_ACTIONS:
            raise InvalidArgumentError(f"{where}: errnoRet is only valid with ERRNO or TRACE")
    args = rule.get("args")
    if args is not None:
        if not isinstance(args, list) or len(args) > 6:
            raise InvalidArgumentError(f"{where}: args must be a list of at most 6 conditions")
        for a in args:
            if not isinstance(a, dict):
                raise InvalidArgumentError(f"{where}: each arg must be an object")
            if not _uint(a.get("index"), 5):
                raise InvalidArgumentError(f"{where}: arg index {a.get('index')!r:.40} not 0..5")
            if not _uint(a.get("value", 0), _U64_MAX) or not _uint(a.get("valueTwo", 0), _U64_MAX):
                raise InvalidArgumentError(f"{where}: arg values must be unsigned 64-bit integers")
            if a.get("op") not in OPERATORS:
                raise InvalidArgumentError(f"{where}: unknown operator {a.get('op')!r:.80}")
    for key in ("includes", "excludes"):
        cond = rule.get(key)
        if cond is None:
            continue
        if not isinstance(cond, dict):
            raise InvalidArgumentError(f"{where}: {key} must be an object")
        for field in ("caps", "arches"):
            if cond.get(field) is not None and not _str_list(cond[field]):
                raise InvalidArgumentError(f"{where}: {key}.{field} must be a list of strings")
        mk = cond.get("minKernel")
        if mk is not None and (not isinstance(mk, str) or not _KERNEL_VERSION.fullmatch(mk)):
            raise InvalidArgumentError(f"{where}: {key}.minKernel {mk!r:.40} is not 'X.Y'")


def _kernel(version: str) -> tuple[int, int]:
    m = _KERNEL_VERSION.fullmatch(version)
    assert m is not None  # validated
    return int(m.group(1)), int(m.group(2))


def _rule_applies(
    rule: dict[str, Any], caps: Collection[str], go_arch: str, kernel: tuple[int, int]
) -> bool:
    exc = rule.get("excludes") or {}
    inc = rule.get("includes") or {}
    if go_arch in (exc.get("arches") or []):
        return False
    if any(c in caps for c in exc.get("caps") or []):
        return False
    if exc.get("minKernel") and kernel >= _kernel(exc["minKernel"]):
        return False
    if inc.get("arches") and go_arch not in inc["arches"]:
        return False
    if any(c not in caps for c in inc.get("caps") or []):
        return False
    return not (inc.get("minKernel") and kernel < _kernel(inc["minKernel"]))


def to_oci(
    profile: dict[str, Any],
    capabilities: Collection[str],
    *,
    arch: tuple[str, str] | None = None,
    kernel: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Evaluate a validated docker-style profile for one container: the OCI `linux.seccomp`.

    `capabilities` is the container's bounding set ("CAP_..." names); `arch` is
    (libseccomp arch, Go arch) and `kernel` (major, minor), both defaulting to this host.
    """
    native, go_arch = arch or host_arch()
    kern = kernel or host_kernel()
    out: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if profile.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    if profile.get("architectures"):
        out["architectures"] = list(profile["architectures"])
    elif profile.get("archMap"):
        # Only the host's family: a filter for foreign arches would be dead weight.
        for entry in profile["archMap"]:
            if entry["architecture"] == native:
                out["architectures"] = [native, *(entry.get("subArchitectures") or [])]
                break
    for key in ("flags", "listenerPath", "listenerMetadata"):
        if profile.get(key):
            out[key] = profile[key]
    syscalls: list[dict[str, Any]] = []
    for rule in profile.get("syscalls") or []:
        if not _rule_applies(rule, capabilities, go_arch, kern):
            continue
        names = rule["names"] if rule.get("names") is not None else [rule["name"]]
        oci: dict[str, Any] = {"names": list(names), "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            oci["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            oci["args"] = [
                {
                    "index": a["index"],
                    "value": a.get("value", 0),
                    "valueTwo": a.get("valueTwo", 0),
                    "op": a["op"],
                }
                for a in rule["args"]
            ]
        syscalls.append(oci)
    out["syscalls"] = syscalls
    return out
