"""Tests for cripy.oci.seccomp: the default profile, localhost profiles, OCI conversion."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cripy.errors import InvalidArgumentError, NotFoundError
from cripy.oci import seccomp
from cripy.oci.spec import DEFAULT_CAPABILITIES

AMD64 = ("SCMP_ARCH_X86_64", "amd64")
ARM64 = ("SCMP_ARCH_AARCH64", "arm64")
NEW_KERNEL = (6, 1)


def allowed(oci: dict[str, Any]) -> set[str]:
    """Names allowed unconditionally (rules without argument filters)."""
    return {
        n
        for r in oci["syscalls"]
        if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
        for n in r["names"]
    }


def rules_for(oci: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in oci["syscalls"] if name in r["names"]]


def default_oci(caps: tuple[str, ...] = DEFAULT_CAPABILITIES, **kw: Any) -> dict[str, Any]:
    kw.setdefault("arch", AMD64)
    kw.setdefault("kernel", NEW_KERNEL)
    return seccomp.to_oci(seccomp.default_profile(), caps, **kw)


def test_default_profile_is_valid() -> None:
    text = json.dumps(seccomp.default_profile())
    profile = seccomp.parse_profile(text)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    names = [n for r in profile["syscalls"] for n in r["names"]]
    assert len(names) > 350


def test_default_profile_coverage() -> None:
    ok = allowed(default_oci())
    everyday = {
        "read", "write", "openat", "close", "execve", "mmap", "mprotect", "munmap", "brk",
        "futex", "epoll_wait", "epoll_pwait", "socket", "connect", "accept4", "exit_group",
        "rt_sigreturn", "rt_sigaction", "getdents64", "statx", "newfstatat", "pipe2", "wait4",
        "prctl", "getrandom", "clock_gettime", "set_robust_list", "rseq", "sendmsg", "recvmsg",
        "fork", "vfork", "setuid", "setgid", "capget", "capset", "chown", "mknodat",
    }  # fmt: skip
    assert everyday <= ok
    dangerous = {
        "mount", "umount2", "unshare", "setns", "kexec_load", "init_module", "bpf", "keyctl",
        "add_key", "request_key", "reboot", "pivot_root", "swapon", "open_by_handle_at",
        "perf_event_open", "iopl", "settimeofday", "acct", "io_uring_setup", "userfaultfd",
    }  # fmt: skip
    assert not (dangerous & ok)
    for name in dangerous:
        assert rules_for(default_oci(), name) == [], name


def test_architectures() -> None:
    assert default_oci()["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert default_oci(arch=ARM64)["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "architectures" not in default_oci(arch=("", "mips"))
    assert default_oci()["defaultErrnoRet"] == 1


def test_arch_specific_rules() -> None:
    assert "arch_prctl" in allowed(default_oci())
    assert "arch_prctl" not in allowed(default_oci(arch=ARM64))
    assert "set_tls" in allowed(default_oci(arch=ARM64))
    assert "set_tls" not in allowed(default_oci())


def test_clone_restricted_without_sys_admin() -> None:
    oci = default_oci()
    assert "clone" not in allowed(oci)
    (clone,) = rules_for(oci, "clone")
    (arg,) = clone["args"]
    assert arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["index"] == 0 and arg["valueTwo"] == 0
    assert arg["value"] & 0x10000000  # CLONE_NEWUSER is in the mask
    (clone3,) = rules_for(oci, "clone3")
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}


def test_sys_admin_unlocks() -> None:
    oci = default_oci((*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"))
    ok = allowed(oci)
    assert {"mount", "unshare", "setns", "clone", "clone3", "personality"} <= ok
    assert all(r["action"] == "SCMP_ACT_ALLOW" for r in rules_for(oci, "clone3"))
    assert "ptrace" in ok


def test_personality_limited() -> None:
    rules = rules_for(default_oci(), "personality")
    assert rules and all(r.get("args") for r in rules)
    values = {r["args"][0]["value"] for r in rules}
    assert values == {0, 8, 0x20000, 0x20008, 0xFFFFFFFF}


def test_min_kernel() -> None:
    assert "ptrace" in allowed(default_oci(kernel=(4, 8)))
    assert "ptrace" not in allowed(default_oci(kernel=(4, 4)))
    assert "ptrace" in allowed(
        default_oci((*DEFAULT_CAPABILITIES, "CAP_SYS_PTRACE"), kernel=(4, 4))
    )


def test_includes_excludes_evaluation() -> None:
    profile = seccomp.parse_profile(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [
                    {"name": "a", "action": "SCMP_ACT_ERRNO"},
                    {"names": ["b"], "action": "SCMP_ACT_LOG", "excludes": {"arches": ["amd64"]}},
                    {"names": ["c"], "action": "SCMP_ACT_KILL", "excludes": {"minKernel": "5.0"}},
                    {
                        "names": ["d"],
                        "action": "SCMP_ACT_ERRNO",
                        "errnoRet": 5,
                        "includes": {"caps": ["CAP_A", "CAP_B"]},
                    },
                    {
                        "names": ["e"],
                        "action": "SCMP_ACT_TRACE",
                        "args": [{"index": 1, "value": 2, "op": "SCMP_CMP_GT"}],
                    },
                ],
            }
        )
    )
    oci = seccomp.to_oci(profile, ["CAP_A"], arch=AMD64, kernel=(5, 10))
    assert oci["architectures"] == ["SCMP_ARCH_X86_64"]
    assert oci["syscalls"] == [
        {"names": ["a"], "action": "SCMP_ACT_ERRNO"},
        {
            "names": ["e"],
            "action": "SCMP_ACT_TRACE",
            "args": [{"index": 1, "value": 2, "valueTwo": 0, "op": "SCMP_CMP_GT"}],
        },
    ]
    both = seccomp.to_oci(profile, ["CAP_A", "CAP_B"], arch=ARM64, kernel=(4, 0))
    assert [r["names"] for r in both["syscalls"]] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert both["syscalls"][3]["errnoRet"] == 5


BAD_PROFILES: list[Any] = [
    [],
    {},
    {"defaultAction": "SCMP_ACT_NOPE"},
    {"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1},
    {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1},
    {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": True},
    {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_Z80"]},
    {"defaultAction": "SCMP_ACT_ERRNO", "architectures": "SCMP_ARCH_X86_64"},
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "archMap": [{"architecture": "SCMP_ARCH_X86_64"}],
    },
    {"defaultAction": "SCMP_ACT_ERRNO", "archMap": [{"architecture": "x"}]},
    {"defaultAction": "SCMP_ACT_ERRNO", "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": {}},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": ["read"]},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"action": "SCMP_ACT_ALLOW"}]},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [1], "action": "SCMP_ACT_ALLOW"}]},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["../x"], "action": "X"}]},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "X"}]},
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}],
    },
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {
                "names": ["read"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 6, "op": "SCMP_CMP_EQ"}],
            }
        ],
    },
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "op": "EQ"}]}
        ],
    },
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {
                "names": ["read"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 1 << 64, "op": "SCMP_CMP_EQ"}],
            }
        ],
    },
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": "X"}}],
    },
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "new"}}
        ],
    },
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}],
    },
]


@pytest.mark.parametrize("profile", BAD_PROFILES)
def test_invalid_profiles(profile: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        seccomp.parse_profile(json.dumps(profile))


@pytest.mark.parametrize("text", ["", "{", "not json", "[" * 100_000, '{"a": NaN'])
def test_not_json(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        seccomp.parse_profile(text)


# --- localhost profiles --------------------------------------------------------------


MINIMAL = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
}


def test_localhost_valid(tmp_path: Path) -> None:
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(MINIMAL))
    assert seccomp.load_localhost_profile(str(p)) == MINIMAL


def test_localhost_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        seccomp.load_localhost_profile(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("path", ["", "profile.json", "./x.json", "/a/../etc/passwd", "/a\x00b"])
def test_localhost_bad_path(path: str) -> None:
    with pytest.raises(InvalidArgumentError):
        seccomp.load_localhost_profile(path)


def test_localhost_not_json(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text("defaultAction: allow\n")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        seccomp.load_localhost_profile(str(p))


def test_localhost_huge(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    with open(p, "wb") as f:
        f.truncate(seccomp.MAX_PROFILE_SIZE + 1)
    with pytest.raises(InvalidArgumentError, match="larger"):
        seccomp.load_localhost_profile(str(p))


def test_localhost_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="regular file"):
        seccomp.load_localhost_profile(str(tmp_path))


def test_localhost_fifo_does_not_block(tmp_path: Path) -> None:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    errors: list[Exception] = []

    def load() -> None:
        try:
            seccomp.load_localhost_profile(str(p))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    t = threading.Thread(target=load)
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], InvalidArgumentError)


def test_host_arch_and_kernel() -> None:
    native, go = seccomp.host_arch()
    assert go
    assert seccomp.host_kernel() >= (0, 0)
