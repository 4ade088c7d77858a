"""`cripy ctl` pod and container verbs, following crictl: runp, pods, inspectp, stopp, rmp,
create, start, run, ps, inspect, stop, rm, logs, exec and update.

IDs may be given as unique prefixes; they are resolved here, over the full lists, so this
works the same against any runtime. Logs are read from the file the runtime reports in
ContainerStatus.log_path, as crictl and the kubelet do.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from cripy.api import api_pb2 as pb
from cripy.cli import crilog
from cripy.cli.ctl import (
    AddVerb,
    Client,
    CtlError,
    age,
    auth_config,
    fail,
    load_container_config,
    load_pod_config,
    maybe_json,
    parse_labels,
    print_table,
    pull_image,
    resolve_id,
    rfc3339,
    rpc_error,
)

POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
TRUNCATED_ID = 13

POD_STATES: dict[str, pb.PodSandboxState] = {
    "ready": pb.SANDBOX_READY, "notready": pb.SANDBOX_NOTREADY}
POD_STATE_NAMES: dict[int, str] = {pb.SANDBOX_READY: "Ready", pb.SANDBOX_NOTREADY: "NotReady"}
CONTAINER_STATES: dict[str, pb.ContainerState] = {
    "created": pb.CONTAINER_CREATED, "running": pb.CONTAINER_RUNNING,
    "exited": pb.CONTAINER_EXITED, "unknown": pb.CONTAINER_UNKNOWN}
CONTAINER_STATE_NAMES: dict[int, str] = {
    int(v): k.capitalize() for k, v in CONTAINER_STATES.items()}

_DIGEST = re.compile(r"(sha256|sha384|sha512):[0-9a-f]{32,128}")


# --- pure helpers (unit-tested) -------------------------------------------------------


def truncate_id(value: str, no_trunc: bool = False) -> str:
    return value if no_trunc else value[:TRUNCATED_ID]


def image_column(image: str, no_trunc: bool = False) -> str:
    """An image as ps shows it: digests (image IDs) shortened like IDs, names as they are."""
    if not no_trunc and _DIGEST.fullmatch(image):
        return image.partition(":")[2][:TRUNCATED_ID]
    return image


def pod_state_name(state: int) -> str:
    return POD_STATE_NAMES.get(state, "Unknown")


def container_state_name(state: int) -> str:
    return CONTAINER_STATE_NAMES.get(state, "Unknown")


def _regex(pattern: str | None) -> Callable[[str], bool]:
    if not pattern:
        return lambda _: True
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise CtlError("INVALID_ARGUMENT", f"bad regular expression {pattern!r}: {exc}") from None
    return lambda text: compiled.search(text) is not None


def _newest(items: list[Any], latest: bool, last: int) -> list[Any]:
    items = sorted(items, key=lambda item: item.created_at, reverse=True)
    count = len(items)
    if latest:
        count = 1
    if last > 0:
        count = last
    return items[:count]


def _labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def filter_pods(pods: Iterable[pb.PodSandbox], *, id_prefix: str = "", name: str | None = None,
                namespace: str | None = None, state: int | None = None,
                labels: Mapping[str, str] | None = None, latest: bool = False,
                last: int = 0) -> list[pb.PodSandbox]:
    """crictl's pod list filters; names and namespaces are regular expressions."""
    name_ok, namespace_ok = _regex(name), _regex(namespace)
    chosen = [p for p in pods
              if p.id.startswith(id_prefix)
              and (state is None or p.state == state)
              and _labels_match(p.labels, labels or {})
              and name_ok(p.metadata.name) and namespace_ok(p.metadata.namespace)]
    return _newest(chosen, latest, last)


def filter_containers(containers: Iterable[pb.Container], *, id_prefix: str = "",
                      pod_prefix: str = "", name: str | None = None,
                      state: int | None = None, labels: Mapping[str, str] | None = None,
                      image: Callable[[pb.Container], bool] | None = None,
                      latest: bool = False, last: int = 0) -> list[pb.Container]:
    name_ok = _regex(name)
    chosen = [c for c in containers
              if c.id.startswith(id_prefix) and c.pod_sandbox_id.startswith(pod_prefix)
              and (state is None or c.state == state)
              and _labels_match(c.labels, labels or {})
              and name_ok(c.metadata.name) and (image is None or image(c))]
    return _newest(chosen, latest, last)


def pod_rows(pods: Iterable[pb.PodSandbox], now_nanos: int, no_trunc: bool = False
             ) -> list[list[str]]:
    rows = [["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"]]
    for pod in pods:
        rows.append([truncate_id(pod.id, no_trunc), age(pod.created_at, now_nanos),
                     pod_state_name(pod.state), pod.metadata.name, pod.metadata.namespace,
                     str(pod.metadata.attempt), pod.runtime_handler or "(default)"])
    return rows


def pod_name_of(container: pb.Container, pod_names: Mapping[str, str]) -> str:
    return (container.labels.get(POD_NAME_LABEL)
            or pod_names.get(container.pod_sandbox_id) or "unknown")


def container_rows(containers: Iterable[pb.Container], pod_names: Mapping[str, str],
                   now_nanos: int, no_trunc: bool = False) -> list[list[str]]:
    rows = [["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID", "POD"]]
    for c in containers:
        rows.append([truncate_id(c.id, no_trunc), image_column(c.image.image, no_trunc),
                     age(c.created_at, now_nanos), container_state_name(c.state),
                     c.metadata.name, str(c.metadata.attempt),
                     truncate_id(c.pod_sandbox_id, no_trunc), pod_name_of(c, pod_names)])
    return rows


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """`--memory` values: bytes, or with a binary suffix (k, m, g, t; "512m", "1Gi")."""
    match = re.fullmatch(r"(\d+)\s*(?:([kmgt])i?)?b?", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 67108864, 64m, 1g)")
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_since(text: str, now_nanos: int) -> int:
    """`--since`: a Go duration back from now ("42m", "1h30m"), an RFC 3339 time (a zone
    is optional: UTC without one), a date, or Unix seconds. Returns nanoseconds."""
    value = text.strip()
    if value and _DURATION_PART.sub("", value) == "" and _DURATION_PART.match(value):
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
        return now_nanos - int(seconds * 1e9)
    if re.fullmatch(r"\d+(\.\d{1,9})?", value):
        whole, _, frac = value.partition(".")
        return int(whole) * 1_000_000_000 + int(frac.ljust(9, "0") or 0)
    candidates = [value, value + "Z", value + "T00:00:00Z"]
    for candidate in candidates:
        try:
            return crilog.Timestamp.parse(candidate).nanos
        except crilog.LogFormatError:
            continue
    raise CtlError("INVALID_ARGUMENT", f"--since {text!r} is neither a duration like 42m nor "
                                       "a time like 2013-01-02T13:23:37Z")


def exit_status(code: int) -> int:
    """A command's exit code as this process's exit status (never 0 for a failure)."""
    if code == 0:
        return 0
    return code & 0xFF or 1


def status_entry(status: Message, info: Mapping[str, str], times: Iterable[str]
                 ) -> dict[str, Any]:
    """inspect's JSON for one object: times as RFC 3339 like crictl, verbose info decoded."""
    data = MessageToDict(status, always_print_fields_with_no_presence=True)
    for field in times:
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), field)
        data[camel] = rfc3339(int(getattr(status, field)))
    entry: dict[str, Any] = {"status": data}
    if info:
        entry["info"] = {key: maybe_json(value) for key, value in sorted(info.items())}
    return entry


def dump_entries(entries: list[dict[str, Any]]) -> str:
    """One object as itself, several as a list (crictl's inspect output)."""
    return json.dumps(entries[0] if len(entries) == 1 else entries, indent=2)


def to_json(message: Message) -> str:
    return json.dumps(MessageToDict(message, always_print_fields_with_no_presence=True),
                      indent=2)


# --- lookups --------------------------------------------------------------------------


def list_pods(client: Client, args: argparse.Namespace,
              flt: pb.PodSandboxFilter | None = None) -> list[pb.PodSandbox]:
    request = pb.ListPodSandboxRequest(filter=flt) if flt else pb.ListPodSandboxRequest()
    return list(client.runtime.ListPodSandbox(request, timeout=args.timeout).items)


def list_containers(client: Client, args: argparse.Namespace,
                    flt: pb.ContainerFilter | None = None) -> list[pb.Container]:
    request = pb.ListContainersRequest(filter=flt) if flt else pb.ListContainersRequest()
    return list(client.runtime.ListContainers(request, timeout=args.timeout).containers)


def resolve_pod(client: Client, args: argparse.Namespace, prefix: str) -> str:
    return resolve_id(prefix, (p.id for p in list_pods(client, args)), "pod")


def resolve_container(client: Client, args: argparse.Namespace, prefix: str) -> str:
    return resolve_id(prefix, (c.id for c in list_containers(client, args)), "container")


def pod_status(client: Client, args: argparse.Namespace, pod_id: str, verbose: bool = False
               ) -> pb.PodSandboxStatusResponse:
    response: pb.PodSandboxStatusResponse = client.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose),
        timeout=args.timeout)
    return response


def container_status(client: Client, args: argparse.Namespace, container_id: str,
                     verbose: bool = False) -> pb.ContainerStatusResponse:
    response: pb.ContainerStatusResponse = client.runtime.ContainerStatus(
        pb.ContainerStatusRequest(container_id=container_id, verbose=verbose),
        timeout=args.timeout)
    return response


def _remove_each(args: argparse.Namespace, all_ids: Callable[[], list[str]],
                 resolve: Callable[[str], str], remove: Callable[[str], None]) -> int:
    """rm and rmp: every ID (or --all), going on after a failure; each failure one line."""
    if args.all and args.ids:
        raise CtlError("INVALID_ARGUMENT", "give IDs or --all, not both")
    if not args.all and not args.ids:
        raise CtlError("INVALID_ARGUMENT", "give at least one ID, or --all")
    items = all_ids() if args.all else list(args.ids)
    status = 0
    for item in items:
        try:
            remove(item if args.all else resolve(item))
        except CtlError as exc:
            status = fail(args.verb, exc.code, str(exc))
        except grpc.RpcError as exc:
            code, details = rpc_error(exc)
            status = fail(args.verb, code, f"{item}: {details}")
    return status


# --- pods -----------------------------------------------------------------------------


def _call_timeout(args: argparse.Namespace) -> float | None:
    """Deadline of calls that change state: --cancel-timeout, or none."""
    value = getattr(args, "cancel_timeout", 0.0)
    return float(value) if value and value > 0 else None


def cmd_runp(client: Client, args: argparse.Namespace) -> None:
    config = load_pod_config(args.config)
    response = client.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=config, runtime_handler=args.runtime or ""),
        timeout=_call_timeout(args))
    print(response.pod_sandbox_id)


def cmd_pods(client: Client, args: argparse.Namespace) -> None:
    labels = parse_labels(args.label)
    state = POD_STATES[args.state] if args.state else None
    flt = pb.PodSandboxFilter(label_selector=labels)
    if state is not None:
        flt.state.CopyFrom(pb.PodSandboxStateValue(state=state))
    pods = filter_pods(list_pods(client, args, flt), id_prefix=args.id or "", name=args.name,
                       namespace=args.namespace, state=state, labels=labels,
                       latest=args.latest, last=args.last)
    if args.output == "json":
        print(to_json(pb.ListPodSandboxResponse(items=pods)))
    elif args.quiet:
        for pod in pods:
            print(pod.id)
    elif args.verbose:
        for pod in pods:
            _print_pod_verbose(pod)
    else:
        print_table(pod_rows(pods, time.time_ns(), args.no_trunc))


def _print_mapping(title: str, values: Mapping[str, str]) -> None:
    if values:
        print(f"{title}:")
        for key in sorted(values):
            print(f"\t{key} -> {values[key]}")


def _print_pod_verbose(pod: pb.PodSandbox) -> None:
    print(f"ID: {pod.id}")
    print(f"Name: {pod.metadata.name}")
    print(f"UID: {pod.metadata.uid}")
    print(f"Namespace: {pod.metadata.namespace}")
    print(f"Attempt: {pod.metadata.attempt}")
    print(f"Status: {pod_state_name(pod.state)}")
    print(f"Created: {rfc3339(pod.created_at)}")
    _print_mapping("Labels", pod.labels)
    _print_mapping("Annotations", pod.annotations)
    print(f"Runtime: {pod.runtime_handler or '(default)'}")
    print()


def cmd_inspectp(client: Client, args: argparse.Namespace) -> None:
    entries = []
    for pod_id in [resolve_pod(client, args, prefix) for prefix in args.ids]:
        response = pod_status(client, args, pod_id, verbose=not args.quiet)
        entries.append(status_entry(response.status, response.info, ["created_at"]))
    print(dump_entries(entries))


def _stop_pod(client: Client, pod_id: str) -> None:
    client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    print(f"Stopped sandbox {pod_id}")


def cmd_stopp(client: Client, args: argparse.Namespace) -> None:
    for pod_id in [resolve_pod(client, args, prefix) for prefix in args.ids]:
        _stop_pod(client, pod_id)


def cmd_rmp(client: Client, args: argparse.Namespace) -> int:
    def remove(pod_id: str) -> None:
        if pod_status(client, args, pod_id).status.state == pb.SANDBOX_READY:
            if not args.force:
                raise CtlError("FAILED_PRECONDITION",
                               f"pod {pod_id} is running, stop it first or use --force")
            _stop_pod(client, pod_id)
        client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        print(f"Removed sandbox {pod_id}")

    return _remove_each(args, lambda: [p.id for p in list_pods(client, args)],
                        lambda prefix: resolve_pod(client, args, prefix), remove)


# --- containers -----------------------------------------------------------------------


def _ensure_image(client: Client, args: argparse.Namespace, config: pb.ContainerConfig,
                  pod_config: pb.PodSandboxConfig) -> None:
    """Pull the container's image when it is missing (always with --with-pull)."""
    image = config.image.image
    if not config.image.user_specified_image:
        config.image.user_specified_image = image
    if args.no_pull and args.with_pull:
        raise CtlError("INVALID_ARGUMENT", "--no-pull and --with-pull conflict")
    if args.no_pull:
        return
    if not args.with_pull:
        status = client.image.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
                                          timeout=args.timeout)
        if status.HasField("image"):
            return
    auth = auth_config(args)
    spec = pb.ImageSpec(image=image, annotations=config.image.annotations)
    pull_image(client, pb.PullImageRequest(image=spec, auth=auth, sandbox_config=pod_config))


def _create(client: Client, args: argparse.Namespace, pod_id: str,
            config: pb.ContainerConfig, pod_config: pb.PodSandboxConfig) -> str:
    response = client.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                  sandbox_config=pod_config),
        timeout=_call_timeout(args))
    return str(response.container_id)


def _start(client: Client, args: argparse.Namespace, container_id: str) -> None:
    client.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id),
                                  timeout=_call_timeout(args))


def cmd_create(client: Client, args: argparse.Namespace) -> None:
    config = load_container_config(args.container_config)
    pod_config = load_pod_config(args.pod_config)
    pod_id = resolve_pod(client, args, args.pod)
    _ensure_image(client, args, config, pod_config)
    print(_create(client, args, pod_id, config, pod_config))


def cmd_start(client: Client, args: argparse.Namespace) -> None:
    for container_id in [resolve_container(client, args, p) for p in args.ids]:
        _start(client, args, container_id)
        print(container_id)


def cmd_run(client: Client, args: argparse.Namespace) -> None:
    config = load_container_config(args.container_config)
    pod_config = load_pod_config(args.pod_config)
    _ensure_image(client, args, config, pod_config)
    pod_id = client.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=pod_config, runtime_handler=args.runtime or ""),
        timeout=_call_timeout(args)).pod_sandbox_id
    try:
        container_id = _create(client, args, pod_id, config, pod_config)
        _start(client, args, container_id)
    except grpc.RpcError:  # do not leave a half-made pod behind
        try:
            client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        except grpc.RpcError:
            pass
        raise
    print(container_id)


def _image_matcher(client: Client, args: argparse.Namespace, image: str
                   ) -> Callable[[pb.Container], bool]:
    wanted = {image}
    status = client.image.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
                                      timeout=args.timeout)
    if status.HasField("image"):
        wanted |= {status.image.id, *status.image.repo_tags, *status.image.repo_digests}
    return lambda c: bool({c.image.image, c.image_ref, c.image_id} & wanted)


def cmd_ps(client: Client, args: argparse.Namespace) -> None:
    labels = parse_labels(args.label)
    state = CONTAINER_STATES[args.state] if args.state else None
    if state is None and not args.all:
        state = pb.CONTAINER_RUNNING
    if args.latest or args.last > 0:
        state = None  # as crictl: the newest containers in any state
    flt = pb.ContainerFilter(label_selector=labels)
    if state is not None:
        flt.state.CopyFrom(pb.ContainerStateValue(state=state))
    matcher = _image_matcher(client, args, args.image) if args.image else None
    containers = filter_containers(
        list_containers(client, args, flt), id_prefix=args.id or "", pod_prefix=args.pod or "",
        name=args.name, state=state, labels=labels, image=matcher, latest=args.latest,
        last=args.last)
    if args.namespace:
        pods = {p.id: p.metadata.namespace for p in list_pods(client, args)}
        ok = _regex(args.namespace)
        containers = [c for c in containers if ok(c.labels.get(POD_NAMESPACE_LABEL)
                                                  or pods.get(c.pod_sandbox_id, ""))]
    if args.output == "json":
        print(to_json(pb.ListContainersResponse(containers=containers)))
        return
    if args.quiet:
        for c in containers:
            print(c.id)
        return
    try:
        pod_names = {p.id: p.metadata.name for p in list_pods(client, args)}
    except grpc.RpcError:
        pod_names = {}
    if args.verbose:
        for c in containers:
            _print_container_verbose(c, pod_names)
    else:
        print_table(container_rows(containers, pod_names, time.time_ns(), args.no_trunc))


def _print_container_verbose(c: pb.Container, pod_names: Mapping[str, str]) -> None:
    print(f"ID: {c.id}")
    print(f"PodID: {c.pod_sandbox_id}")
    print(f"Pod: {pod_name_of(c, pod_names)}")
    print(f"Name: {c.metadata.name}")
    print(f"Attempt: {c.metadata.attempt}")
    print(f"State: {container_state_name(c.state)}")
    print(f"Image: {c.image.image}")
    print(f"Created: {age(c.created_at)}")
    _print_mapping("Labels", c.labels)
    _print_mapping("Annotations", c.annotations)
    print()


def cmd_inspect(client: Client, args: argparse.Namespace) -> None:
    entries = []
    for container_id in [resolve_container(client, args, p) for p in args.ids]:
        response = container_status(client, args, container_id, verbose=not args.quiet)
        entries.append(status_entry(response.status, response.info,
                                    ["created_at", "started_at", "finished_at"]))
    print(dump_entries(entries))


def _stop_container(client: Client, container_id: str, timeout: int) -> None:
    client.runtime.StopContainer(
        pb.StopContainerRequest(container_id=container_id, timeout=timeout))


def cmd_stop(client: Client, args: argparse.Namespace) -> None:
    if args.all:
        if args.ids:
            raise CtlError("INVALID_ARGUMENT", "give IDs or --all, not both")
        flt = pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
        ids = [c.id for c in list_containers(client, args, flt)
               if c.state == pb.CONTAINER_RUNNING]
    elif not args.ids:
        raise CtlError("INVALID_ARGUMENT", "give at least one CONTAINER, or --all")
    else:
        ids = [resolve_container(client, args, p) for p in args.ids]
    for container_id in ids:
        _stop_container(client, container_id, args.stop_timeout)
        print(container_id)


def cmd_checkpoint(client: Client, args: argparse.Namespace) -> None:
    """crictl's `checkpoint --export PATH CONTAINER`: the archive of a running container."""
    location = str(Path(args.export).absolute())
    for container_id in [resolve_container(client, args, p) for p in args.ids]:
        client.runtime.CheckpointContainer(pb.CheckpointContainerRequest(
            container_id=container_id, location=location, timeout=args.checkpoint_timeout))
        print(container_id)


def _remove_logs(log_path: str) -> None:
    if not log_path:
        return
    path = Path(log_path)
    for candidate in [path, *path.parent.glob(path.name + ".*")]:
        try:
            if not candidate.is_dir():
                candidate.unlink()
        except OSError:
            pass


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    def remove(container_id: str) -> None:
        status = container_status(client, args, container_id).status
        if status.state == pb.CONTAINER_RUNNING:
            if not args.force:
                raise CtlError("FAILED_PRECONDITION", f"container {container_id} is running, "
                                                      "stop it first or use --force")
            _stop_container(client, container_id, 0)
        client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id))
        if not args.keep_logs:
            _remove_logs(status.log_path)
        print(container_id)

    return _remove_each(args, lambda: [c.id for c in list_containers(client, args)],
                        lambda prefix: resolve_container(client, args, prefix), remove)


def cmd_update(client: Client, args: argparse.Namespace) -> None:
    changes = {"cpu_period": args.cpu_period, "cpu_quota": args.cpu_quota,
               "cpu_shares": args.cpu_share, "cpuset_cpus": args.cpuset_cpus,
               "cpuset_mems": args.cpuset_mems, "memory_limit_in_bytes": args.memory}
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise CtlError("INVALID_ARGUMENT", "give at least one resource flag, e.g. --memory")
    for container_id in [resolve_container(client, args, p) for p in args.ids]:
        # Start from what is applied now, so flags not given keep their values.
        current = container_status(client, args, container_id).status.resources.linux
        resources = pb.LinuxContainerResources()
        resources.CopyFrom(current)
        for key, value in changes.items():
            setattr(resources, key, value)
        client.runtime.UpdateContainerResources(
            pb.UpdateContainerResourcesRequest(container_id=container_id, linux=resources),
            timeout=args.timeout)
        print(container_id)


# --- logs and exec --------------------------------------------------------------------


def _write_lines(lines: Iterable[crilog.LogLine], timestamps: bool) -> None:
    for line in lines:
        out = sys.stdout if line.stream == crilog.STDOUT else sys.stderr
        out.buffer.write(line.render(timestamps))
    sys.stdout.buffer.flush()
    sys.stderr.buffer.flush()


def cmd_logs(client: Client, args: argparse.Namespace) -> None:
    container_id = resolve_container(client, args, args.container)
    log_path = container_status(client, args, container_id).status.log_path
    if not log_path:
        raise CtlError("FAILED_PRECONDITION", f"container {container_id} has no log path")
    if args.reopen:
        client.runtime.ReopenContainerLog(
            pb.ReopenContainerLogRequest(container_id=container_id), timeout=args.timeout)
    since = parse_since(args.since, time.time_ns()) if args.since else None
    streams = [args.stream] if args.stream else list(crilog.STREAMS)

    def chosen(lines: list[crilog.LogLine]) -> list[crilog.LogLine]:
        return crilog.select(lines, since_nanos=since, streams=streams)

    def is_running() -> bool:
        try:
            state = container_status(client, args, container_id).status.state
        except grpc.RpcError as exc:
            if hasattr(exc, "code") and exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return bool(state == pb.CONTAINER_RUNNING)

    try:
        log = crilog.LogFile(log_path)
    except FileNotFoundError:
        raise CtlError("NOT_FOUND", f"log file {log_path} does not exist") from None
    except OSError as exc:
        raise CtlError("FAILED_PRECONDITION",
                       f"cannot read log file {log_path}: {exc.strerror}") from None
    with log:
        joiner = crilog.LineJoiner()
        lines = joiner.feed(log.read())
        if not args.follow:
            lines += joiner.flush()
        _write_lines(crilog.tail(chosen(lines), args.tail), args.timestamps)
        if args.follow:
            for chunk in crilog.follow(log, is_running):
                _write_lines(chosen(joiner.feed(chunk)), args.timestamps)
            _write_lines(chosen(joiner.flush()), args.timestamps)


def cmd_exec(client: Client, args: argparse.Namespace) -> int:
    if args.interactive or args.tty:
        from cripy.cli.ctl_stream import exec_interactive
        return exec_interactive(client, args)
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CtlError("INVALID_ARGUMENT", "give a command to run")
    container_id = resolve_container(client, args, args.container)
    deadline = args.exec_timeout + args.timeout if args.exec_timeout > 0 else None
    response = client.runtime.ExecSync(
        pb.ExecSyncRequest(container_id=container_id, cmd=command, timeout=args.exec_timeout),
        timeout=deadline)
    sys.stdout.buffer.write(response.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(response.stderr)
    sys.stderr.buffer.flush()
    return exit_status(int(response.exit_code))


# --- wiring ---------------------------------------------------------------------------


def _pull_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--no-pull", action="store_true", help="never pull the image")
    sub.add_argument("--with-pull", action="store_true",
                     help="pull the image even when it is present")
    sub.add_argument("--creds", metavar="USER:PASS", help="registry credentials for the pull")
    sub.add_argument("--auth", metavar="AUTH", help="base64 of USER:PASS for the pull")
    sub.add_argument("-T", "--cancel-timeout", type=float, default=0.0, metavar="SECONDS",
                     help="deadline of the create/run calls (default: none)")


def _list_flags(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument("--id", help=f"{what} ID or prefix")
    sub.add_argument("--name", help=f"{what} name (regular expression)")
    sub.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="label selector (repeatable)")
    sub.add_argument("-q", "--quiet", action="store_true", help="only IDs")
    sub.add_argument("-v", "--verbose", action="store_true", help="one block per item")
    sub.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sub.add_argument("-l", "--latest", action="store_true", help=f"the newest {what} only")
    sub.add_argument("-n", "--last", type=int, default=0, metavar="N",
                     help=f"the N newest {what}s (any state)")
    sub.add_argument("--no-trunc", action="store_true", help="full IDs")


def add_verbs(verb: AddVerb) -> None:
    runp = verb("runp", cmd_runp, "run a pod from a PodSandboxConfig JSON file", ())
    runp.add_argument("config", metavar="POD_CONFIG.json")
    runp.add_argument("--runtime", metavar="HANDLER", help="runtime handler")
    runp.add_argument("-T", "--cancel-timeout", type=float, default=0.0, metavar="SECONDS",
                      help="deadline of the call (default: none)")

    pods = verb("pods", cmd_pods, "list pods", ())
    _list_flags(pods, "pod")
    pods.add_argument("--namespace", help="pod namespace (regular expression)")
    pods.add_argument("-s", "--state", type=str.lower, choices=sorted(POD_STATES))

    inspectp = verb("inspectp", cmd_inspectp, "pod status as JSON", ())
    inspectp.add_argument("ids", nargs="+", metavar="POD")
    inspectp.add_argument("-q", "--quiet", action="store_true", help="status only, no info")
    inspectp.add_argument("-o", "--output", choices=["json"], default="json")

    stopp = verb("stopp", cmd_stopp, "stop pods", ())
    stopp.add_argument("ids", nargs="+", metavar="POD")

    rmp = verb("rmp", cmd_rmp, "remove pods", ())
    rmp.add_argument("ids", nargs="*", metavar="POD")
    rmp.add_argument("-f", "--force", action="store_true", help="stop ready pods first")
    rmp.add_argument("-a", "--all", action="store_true", help="remove every pod")

    create = verb("create", cmd_create, "create a container in a pod", ())
    create.add_argument("pod", metavar="POD")
    create.add_argument("container_config", metavar="CONTAINER_CONFIG.json")
    create.add_argument("pod_config", metavar="POD_CONFIG.json")
    _pull_flags(create)

    start = verb("start", cmd_start, "start created containers", ())
    start.add_argument("ids", nargs="+", metavar="CONTAINER")

    run = verb("run", cmd_run, "run a pod, create a container in it, start it", ())
    run.add_argument("container_config", metavar="CONTAINER_CONFIG.json")
    run.add_argument("pod_config", metavar="POD_CONFIG.json")
    run.add_argument("--runtime", metavar="HANDLER", help="runtime handler")
    _pull_flags(run)

    ps = verb("ps", cmd_ps, "list containers (running ones unless -a)", ())
    _list_flags(ps, "container")
    ps.add_argument("-a", "--all", action="store_true", help="containers in every state")
    ps.add_argument("-p", "--pod", help="pod ID or prefix")
    ps.add_argument("--image", help="image name or ID")
    ps.add_argument("--namespace", help="pod namespace (regular expression)")
    ps.add_argument("-s", "--state", type=str.lower, choices=sorted(CONTAINER_STATES))

    inspect = verb("inspect", cmd_inspect, "container status as JSON", ())
    inspect.add_argument("ids", nargs="+", metavar="CONTAINER")
    inspect.add_argument("-q", "--quiet", action="store_true", help="status only, no info")
    inspect.add_argument("-o", "--output", choices=["json"], default="json")

    stop = verb("stop", cmd_stop, "stop containers", ())
    stop.add_argument("ids", nargs="*", metavar="CONTAINER")
    stop.add_argument("-t", "--timeout", dest="stop_timeout", type=int, default=0,
                      metavar="SECONDS", help="grace period before the kill (default 0)")
    stop.add_argument("-a", "--all", action="store_true", help="stop every running container")

    checkpoint = verb("checkpoint", cmd_checkpoint,
                      "write a checkpoint archive of a running container (CRIU)", ())
    checkpoint.add_argument("ids", nargs=1, metavar="CONTAINER")
    checkpoint.add_argument("--export", required=True, metavar="PATH",
                            help="the archive to write (a .tar)")
    checkpoint.add_argument("--timeout", dest="checkpoint_timeout", type=int, default=0,
                            metavar="SECONDS", help="bound for the dump (default 300)")

    rm = verb("rm", cmd_rm, "remove containers", ())
    rm.add_argument("ids", nargs="*", metavar="CONTAINER")
    rm.add_argument("-f", "--force", action="store_true", help="stop running containers first")
    rm.add_argument("-a", "--all", action="store_true", help="remove every container")
    rm.add_argument("-k", "--keep-logs", action="store_true", help="keep the log files")

    logs = verb("logs", cmd_logs, "print a container's log", ())
    logs.add_argument("container", metavar="CONTAINER")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing until the container stops")
    logs.add_argument("--tail", type=int, default=-1, metavar="N",
                      help="only the last N lines (default: all)")
    logs.add_argument("-t", "--timestamps", action="store_true", help="show timestamps")
    logs.add_argument("--since", metavar="TIME",
                      help="only lines since TIME (2013-01-02T13:23:37Z) or since a duration "
                           "ago (42m)")
    logs.add_argument("-s", "--stream", choices=list(crilog.STREAMS),
                      help="only this stream (default both)")
    logs.add_argument("-r", "--reopen", action="store_true",
                      help="ask the runtime to reopen the log file first")

    exec_ = verb("exec", cmd_exec, "run a command in a container (ExecSync)", ())
    exec_.add_argument("-s", "--sync", action="store_true",
                       help="run synchronously (the default without -i and -t)")
    exec_.add_argument("--timeout", dest="exec_timeout", type=int, default=0,
                       metavar="SECONDS", help="kill the command after SECONDS (default none)")
    exec_.add_argument("-i", "--interactive", action="store_true",
                       help="pass stdin to the command (streams through Exec)")
    exec_.add_argument("-t", "--tty", action="store_true",
                       help="run the command in a terminal (streams through Exec)")
    exec_.add_argument("container", metavar="CONTAINER")
    exec_.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")

    update = verb("update", cmd_update, "change a container's resources", ())
    update.add_argument("ids", nargs="+", metavar="CONTAINER")
    update.add_argument("--cpu-period", type=int, help="CFS period (microseconds)")
    update.add_argument("--cpu-quota", type=int, help="CFS quota (microseconds)")
    update.add_argument("--cpu-share", type=int, help="CPU shares (relative weight)")
    update.add_argument("--cpuset-cpus", help="CPUs to use (e.g. 0-2,4)")
    update.add_argument("--cpuset-mems", help="memory nodes to use")
    update.add_argument("--memory", type=parse_bytes, help="memory limit (bytes, or 64m, 1g)")
