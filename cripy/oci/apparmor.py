"""AppArmor: which profile a container runs under, and cripy's own default profile.

The host is probed once at start (`prepare_host`, run in a thread): is AppArmor enabled,
is `apparmor_parser` installed, and can the `cripy-default` profile be loaded. The spec
builder then only consults those facts (`container_profile`), plus the list of loaded
profiles when a container names one.

Behaviour follows containerd's CRI plugin where the CRI is silent:
- the newer `apparmor` field wins over the deprecated `apparmor_profile` string;
- unset and RuntimeDefault mean `cripy-default`, except for privileged containers,
  which run unconfined unless they name a Localhost profile;
- without AppArmor on the node, unset/RuntimeDefault/Unconfined run unconfined and a
  Localhost profile is refused with the reason.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError

log = logging.getLogger(__name__)

DEFAULT_PROFILE = "cripy-default"
SYS = Path("/sys")
PROFILES_FILE = "kernel/security/apparmor/profiles"  # below /sys
PARSER = "apparmor_parser"
LOAD_TIMEOUT = 60.0
MAX_NAME = 1024

RUNTIME_DEFAULT = "runtime/default"
UNCONFINED = "unconfined"
LOCALHOST_PREFIX = "localhost/"

# Written for cripy from AppArmor's profile language reference (apparmor.d(5)). Self-
# contained (no #include) so it loads wherever apparmor_parser does.
DEFAULT_PROFILE_TEXT = f"""\
# {DEFAULT_PROFILE}: what cripy runs containers under when they ask for the runtime
# default AppArmor profile (or for nothing, on a node with AppArmor enabled).
# Loaded by the cripy daemon at start with `apparmor_parser -K -r`.

profile {DEFAULT_PROFILE} flags=(attach_disconnected,mediate_deleted) {{
  # The OCI spec already decides files, network and capabilities; keep them.
  file,
  network,
  capability,
  umount,

  # Processes of a container may signal and trace one another; the runtime and the
  # host (unconfined) may signal them.
  signal (send, receive) peer={DEFAULT_PROFILE},
  signal (receive) peer=unconfined,
  ptrace (trace, read, tracedby, readby) peer={DEFAULT_PROFILE},

  # No new mounts and no swapping the root, whatever the capabilities.
  deny mount,
  deny remount,
  deny pivot_root,

  # Kernel and device settings under /proc are not the container's to change; the
  # memory images of the kernel are not its to read.
  deny /proc/* w,
  deny /proc/{{acpi,asound,bus,driver,dynamic_debug,fs,irq,scsi,sys,sysvipc,tty}}/** wl,
  deny /proc/{{kcore,kmem,mem,sysrq-trigger}} rwlk,

  # Nor under /sys, except the container's own cgroup files.
  deny /sys/{{block,bus,class,dev,devices,firmware,hypervisor,kernel,module,power}}/** wl,
  deny /sys/fs/{{[^c]*,c[^g]*}}/** wl,
  deny /sys/firmware/** r,
  deny /sys/kernel/{{debug,security,tracing}}/** rwlk,
}}
"""


@dataclass(frozen=True)
class AppArmorHost:
    """What the node offers, probed once at daemon start."""

    enabled: bool = False
    parser: str | None = None  # apparmor_parser's path, None if not installed
    default_error: str = ""  # why cripy-default is unusable ("" when it is loaded)
    sys_root: Path = SYS

    @property
    def profiles_file(self) -> Path:
        return self.sys_root / PROFILES_FILE

    def loaded_profiles(self) -> set[str]:
        """Names of the profiles the kernel has loaded ("name (mode)" lines)."""
        try:
            text = self.profiles_file.read_text(errors="replace")
        except OSError as exc:
            raise FailedPreconditionError(
                f"cannot read the loaded AppArmor profiles ({self.profiles_file}): "
                f"{exc.strerror}") from None
        return {line.rsplit(" (", 1)[0] for line in text.splitlines() if line}


def probe(sys_root: Path = SYS) -> AppArmorHost:
    """Is AppArmor enabled (module parameter and securityfs), where is the parser."""
    try:
        flag = (sys_root / "module/apparmor/parameters/enabled").read_text().strip()
    except OSError:
        flag = ""
    enabled = flag == "Y" and (sys_root / "kernel/security/apparmor").is_dir()
    return AppArmorHost(enabled=enabled, parser=shutil.which(PARSER), sys_root=sys_root)


def load_profile(parser: str, text: str) -> None:
    """Load (or replace) a profile in the kernel; idempotent. Blocking: run in a thread."""
    try:
        result = subprocess.run([parser, "-K", "-r"], input=text.encode(),
                                capture_output=True, timeout=LOAD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPreconditionError(f"{parser} failed: {exc}") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise FailedPreconditionError(
            f"{parser} -K -r exited with {result.returncode}: "
            f"{detail[-1] if detail else 'no message'}")


def prepare_host(sys_root: Path = SYS) -> AppArmorHost:
    """Probe the host and, with AppArmor enabled, load cripy-default. Blocking."""
    host = probe(sys_root)
    if not host.enabled:
        log.info("AppArmor is not enabled on this node; containers run unconfined")
        return host
    error = ""
    if host.parser is not None:
        try:
            load_profile(host.parser, DEFAULT_PROFILE_TEXT)
        except FailedPreconditionError as exc:
            error = f"loading it failed: {exc}"
    else:
        error = f"{PARSER} is not installed (Debian package apparmor)"
    if error:
        try:
            already = DEFAULT_PROFILE in host.loaded_profiles()
        except FailedPreconditionError:
            already = False
        if already:
            log.warning("AppArmor profile %s could not be (re)loaded, using the loaded one: %s",
                        DEFAULT_PROFILE, error)
            error = ""
        else:
            log.error("AppArmor profile %s is unavailable: %s", DEFAULT_PROFILE, error)
    else:
        log.info("AppArmor enabled; loaded profile %s", DEFAULT_PROFILE)
    return AppArmorHost(enabled=True, parser=host.parser, default_error=error,
                        sys_root=sys_root)


# --- which profile a container gets ---------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a container asked for: kind is "default", "unconfined" or "localhost"."""

    kind: str
    name: str = ""


def requested(sc: pb.LinuxContainerSecurityContext) -> Request | None:
    """The container's AppArmor request; None when it asks for nothing."""
    if sc.HasField("apparmor"):
        profile = sc.apparmor
        kind = profile.profile_type
        if kind != pb.SecurityProfile.Localhost and profile.localhost_ref:
            raise InvalidArgumentError(
                f"apparmor: localhost_ref {profile.localhost_ref!r:.200} is only valid "
                "with profile_type Localhost")
        if kind == pb.SecurityProfile.Unconfined:
            return Request(UNCONFINED)
        if kind == pb.SecurityProfile.RuntimeDefault:
            return Request("default")
        if kind == pb.SecurityProfile.Localhost:
            return Request("localhost",
                           _profile_name(profile.localhost_ref.removeprefix(LOCALHOST_PREFIX),
                                         "apparmor localhost_ref"))
        raise InvalidArgumentError(f"apparmor: unknown profile_type {kind}")
    legacy = sc.apparmor_profile
    if not legacy:
        return None
    if legacy == UNCONFINED:
        return Request(UNCONFINED)
    if legacy == RUNTIME_DEFAULT:
        return Request("default")
    if legacy.startswith(LOCALHOST_PREFIX):
        return Request("localhost",
                       _profile_name(legacy.removeprefix(LOCALHOST_PREFIX), "apparmor_profile"))
    raise InvalidArgumentError(
        f"apparmor_profile {legacy!r:.200} is not one of {RUNTIME_DEFAULT!r}, "
        f"{UNCONFINED!r} or '{LOCALHOST_PREFIX}NAME'")


def _profile_name(name: str, what: str) -> str:
    if not name:
        raise InvalidArgumentError(f"{what}: the AppArmor profile name is empty")
    if len(name) > MAX_NAME or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise InvalidArgumentError(f"{what} {name!r:.200} is not a valid AppArmor profile name")
    return name


def container_profile(sc: pb.LinuxContainerSecurityContext, *, privileged: bool,
                      host: AppArmorHost) -> str | None:
    """OCI process.apparmorProfile for a container; None for unconfined.

    Reads the loaded profiles (a small securityfs file) when a Localhost one is named.
    """
    request = requested(sc)
    if not host.enabled:
        if request is not None and request.kind == "localhost":
            raise FailedPreconditionError(
                f"AppArmor profile {request.name!r:.200} was requested, but AppArmor is not "
                "enabled on this node")
        return None
    if request is None or request.kind == "default":
        if privileged:
            return None
        if host.default_error:
            raise FailedPreconditionError(
                f"AppArmor profile {DEFAULT_PROFILE} (the runtime default) is unavailable "
                f"on this node: {host.default_error}")
        return DEFAULT_PROFILE
    if request.kind == UNCONFINED:
        return None
    if request.name not in host.loaded_profiles():
        raise FailedPreconditionError(
            f"AppArmor profile {request.name!r:.200} is not loaded on this node "
            f"(see {host.profiles_file}; load it with apparmor_parser)")
    return request.name
