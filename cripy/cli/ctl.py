"""`cripy ctl`: a CRI client whose verbs and flags follow crictl where they overlap.

It talks plain CRI v1, so it works against any runtime's endpoint, not only cripy's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TextIO, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict, Parse, ParseError
from google.protobuf.message import Message

from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from cripy.cli.crilog import Timestamp

DEFAULT_ENDPOINT = "unix:///run/cripy/cripy.sock"
ENDPOINT_ENV = "CONTAINER_RUNTIME_ENDPOINT"
IMAGE_ENDPOINT_ENV = "IMAGE_SERVICE_ENDPOINT"


class CtlError(Exception):
    """A failure to report as one line: `cripy ctl VERB: CODE: message`.

    `code` is a gRPC status code name, so local failures read like the runtime's.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """Stubs for both services, connected lazily with crictl's connect timeout."""

    def __init__(self, endpoint: str, image_endpoint: str, timeout: float) -> None:
        self.endpoint = _normalise(endpoint)
        self.image_endpoint = _normalise(image_endpoint or endpoint)
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, target: str) -> grpc.Channel:
        if target not in self._channels:
            channel = grpc.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024)])
            try:
                grpc.channel_ready_future(channel).result(timeout=self.timeout)
            except grpc.FutureTimeoutError:
                raise CtlError("UNAVAILABLE", f"cannot connect to {target}: no CRI runtime "
                               f"answers within {self.timeout:g}s") from None
            self._channels[target] = channel
        return self._channels[target]

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        return api_pb2_grpc.RuntimeServiceStub(self._channel(self.endpoint))

    @property
    def image(self) -> api_pb2_grpc.ImageServiceStub:
        return api_pb2_grpc.ImageServiceStub(self._channel(self.image_endpoint))


def _normalise(endpoint: str) -> str:
    if endpoint.startswith("/"):
        return f"unix://{endpoint}"
    return endpoint


# --- output helpers -------------------------------------------------------------------


def to_json(message: Any) -> str:
    return json.dumps(MessageToDict(message), indent=2)


def one_line(text: str) -> str:
    return " ".join(text.split())


def human_duration(seconds: float) -> str:
    """A duration the way crictl (docker's go-units) writes ages: "3 minutes"."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 2:
        return "1 second"
    if seconds < 60:
        return f"{int(seconds)} seconds"
    minutes = int(seconds // 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds // 3600) // 24 // 365} years"


def age(created_nanos: int, now_nanos: int | None = None) -> str:
    """`created_at` (nanoseconds) as crictl's CREATED column: "2 minutes ago"."""
    now = time.time_ns() if now_nanos is None else now_nanos
    return human_duration(max(0, now - created_nanos) / 1e9) + " ago"


def rfc3339(nanos: int) -> str:
    """Nanoseconds since the epoch in UTC, RFC3339Nano style (Go's zero time for 0)."""
    if nanos == 0:
        return "0001-01-01T00:00:00Z"
    return Timestamp(nanos).format()


def human_size(size: int) -> str:
    """Sizes as crictl prints them: decimal units, three significant digits."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.3g}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def print_table(rows: list[list[str]], out: TextIO = sys.stdout) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        out.write("   ".join(cells).rstrip() + "\n")


def short_id(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:13]


def resolve_id(prefix: str, ids: Iterable[str], kind: str) -> str:
    """The one ID in `ids` that is `prefix` or starts with it (crictl's ID prefixes)."""
    if not prefix:
        raise CtlError("INVALID_ARGUMENT", f"{kind} ID cannot be empty")
    candidates = set(ids)
    if prefix in candidates:
        return prefix
    matches = sorted(i for i in candidates if i.startswith(prefix))
    if not matches:
        raise CtlError("NOT_FOUND", f"no {kind} with ID {prefix!r}")
    if len(matches) > 1:
        shown = ", ".join(m[:13] for m in matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise CtlError("INVALID_ARGUMENT",
                       f"{kind} ID prefix {prefix!r} is ambiguous: it matches {shown}")
    return matches[0]


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """`--label key=value` flags as a selector."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CtlError("INVALID_ARGUMENT", f"label {pair!r} is not KEY=VALUE")
        labels[key] = value
    return labels


M = TypeVar("M", bound=Message)


def load_config(path: str, message: M) -> M:
    """Fill `message` from a JSON file in crictl's format (snake_case or lowerCamel)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CtlError("NOT_FOUND", f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError("INVALID_ARGUMENT", f"cannot read config file {path}: {exc}") from None
    try:
        Parse(text, message, ignore_unknown_fields=False)
    except ParseError as exc:
        detail = one_line(str(exc)).split(" Available Fields", 1)[0]
        raise CtlError("INVALID_ARGUMENT", f"{path}: {detail}") from None
    return message


def load_pod_config(path: str) -> pb.PodSandboxConfig:
    config = load_config(path, pb.PodSandboxConfig())
    meta = config.metadata
    if not config.HasField("metadata") or not meta.name or not meta.namespace:
        raise CtlError("INVALID_ARGUMENT", f"{path}: metadata.name and metadata.namespace "
                                           "are required")
    if not meta.uid:
        meta.uid = str(uuid.uuid4())
    return config


def load_container_config(path: str) -> pb.ContainerConfig:
    config = load_config(path, pb.ContainerConfig())
    if not config.HasField("metadata") or not config.metadata.name:
        raise CtlError("INVALID_ARGUMENT", f"{path}: metadata.name is required")
    if not config.image.image:
        raise CtlError("INVALID_ARGUMENT", f"{path}: image.image is required")
    return config


def split_repo(tag: str) -> tuple[str, str]:
    """`registry/repo:tag` -> (`registry/repo`, `tag`), minding ports in the host."""
    name, sep, version = tag.rpartition(":")
    if not sep or "/" in version:
        return tag, "<none>"
    return name, version


# --- verbs ----------------------------------------------------------------------------


def cmd_version(client: Client, args: argparse.Namespace) -> None:
    resp = client.runtime.Version(pb.VersionRequest(version="v1"), timeout=args.timeout)
    print(f"Version:  {resp.version}")
    print(f"RuntimeName:  {resp.runtime_name}")
    print(f"RuntimeVersion:  {resp.runtime_version}")
    print(f"RuntimeApiVersion:  {resp.runtime_api_version}")


def cmd_info(client: Client, args: argparse.Namespace) -> None:
    resp = client.runtime.Status(pb.StatusRequest(verbose=True), timeout=args.timeout)
    out: dict[str, Any] = {"status": MessageToDict(resp.status)}
    # Every handler with each feature spelled out, false ones too (as crictl shows them).
    out["runtimeHandlers"] = [
        MessageToDict(h, always_print_fields_with_no_presence=True)
        for h in resp.runtime_handlers]
    out["features"] = MessageToDict(resp.features, always_print_fields_with_no_presence=True)
    for key, value in resp.info.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    print(json.dumps(out, indent=2))


def cmd_images(client: Client, args: argparse.Namespace) -> None:
    request = pb.ListImagesRequest()
    if args.image:
        request.filter.image.image = args.image
    images = client.image.ListImages(request, timeout=args.timeout).images
    if args.output == "json":
        print(to_json(pb.ListImagesResponse(images=images)))
        return
    if args.quiet:
        for image in images:
            print(image.id)
        return
    header = ["IMAGE", "TAG", *(["DIGEST"] if args.digests else []), "IMAGE ID", "SIZE",
              *(["PINNED"] if args.pinned else [])]
    rows = [header]
    for image in images:
        digest = image.repo_digests[0].rpartition("@")[2] if image.repo_digests else "<none>"
        image_id = image.id if args.no_trunc else short_id(image.id)
        digest = digest if args.no_trunc else short_id(digest)
        tags = [split_repo(t) for t in image.repo_tags] or [
            (image.repo_digests[0].rpartition("@")[0] if image.repo_digests else "<none>",
             "<none>")]
        for repo, tag in tags:
            rows.append([repo, tag, *([digest] if args.digests else []), image_id,
                         human_size(image.size),
                         *([str(image.pinned).lower()] if args.pinned else [])])
    print_table(rows)


def auth_config(args: argparse.Namespace) -> pb.AuthConfig:
    """Registry credentials from --creds USER:PASS or --auth BASE64."""
    auth = pb.AuthConfig()
    if args.creds:
        user, sep, password = args.creds.partition(":")
        if not sep:
            raise CtlError("INVALID_ARGUMENT", "--creds must be USERNAME:PASSWORD")
        auth.username, auth.password = user, password
    if args.auth:
        auth.auth = args.auth
    return auth


def cmd_pull(client: Client, args: argparse.Namespace) -> None:
    auth = auth_config(args)
    resp = pull_image(client, pb.PullImageRequest(image=pb.ImageSpec(image=args.image),
                                                  auth=auth))
    print(f"Image is up to date for {resp.image_ref}")


def pull_image(client: Client, request: pb.PullImageRequest) -> pb.PullImageResponse:
    with Progress(f"Pulling {request.image.image}", _store_bytes(client)):
        response: pb.PullImageResponse = client.image.PullImage(request)
    return response


def _store_bytes(client: Client) -> Callable[[], int | None]:
    def read() -> int | None:
        try:
            info = client.image.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=2)
        except grpc.RpcError:
            return None
        return sum(int(fs.used_bytes.value) for fs in info.image_filesystems)

    return read


class Progress:
    """A one-line live display on stderr while a blocking call runs.

    It shows the elapsed time and how much the image store grew, which any CRI runtime
    reports through ImageFsInfo. Without a terminal it prints a line every 10 seconds.
    """

    def __init__(self, label: str, read_bytes: Callable[[], int | None]) -> None:
        self.label = label
        self.read_bytes = read_bytes
        self.tty = sys.stderr.isatty()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _run(self) -> None:
        start = time.monotonic()
        baseline = self.read_bytes()
        stored = ""
        spinner = "|/-\\"
        tick = 0
        while not self._done.wait(0.25 if self.tty else 10):
            tick += 1
            if not self.tty or tick % 4 == 0:  # ImageFsInfo once a second at most
                now = self.read_bytes()
                if now is not None and baseline is not None:
                    stored = f", {human_size(max(0, now - baseline))} stored"
            elapsed = f"{time.monotonic() - start:.0f}s{stored}"
            if self.tty:
                sys.stderr.write(f"\r\033[K{self.label} {spinner[tick % 4]} {elapsed}")
            else:
                sys.stderr.write(f"{self.label}: {elapsed}\n")
            sys.stderr.flush()


def cmd_inspecti(client: Client, args: argparse.Namespace) -> None:
    results = []
    for name in args.images:
        resp = client.image.ImageStatus(
            pb.ImageStatusRequest(image=pb.ImageSpec(image=name), verbose=not args.quiet),
            timeout=args.timeout,
        )
        if not resp.HasField("image"):
            raise CtlError("NOT_FOUND", f"no such image {name!r} present")
        entry: dict[str, Any] = {"status": MessageToDict(resp.image)}
        if resp.info:
            entry["info"] = {k: maybe_json(v) for k, v in resp.info.items()}
        results.append(entry)
    for entry in results:
        print(json.dumps(entry, indent=2))


def maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def cmd_rmi(client: Client, args: argparse.Namespace) -> None:
    names = list(args.images)
    if args.all:
        names = [i.id for i in client.image.ListImages(pb.ListImagesRequest(),
                                                       timeout=args.timeout).images]
    if not names:
        raise CtlError("INVALID_ARGUMENT", "give at least one IMAGE, or --all")
    for name in names:
        status = client.image.ImageStatus(
            pb.ImageStatusRequest(image=pb.ImageSpec(image=name)), timeout=args.timeout)
        if not status.HasField("image"):
            raise CtlError("NOT_FOUND", f"no such image {name}")
        client.image.RemoveImage(
            pb.RemoveImageRequest(image=pb.ImageSpec(image=status.image.id)),
            timeout=args.timeout)
        for tag in status.image.repo_tags or [status.image.id]:
            print(f"Deleted: {tag}")


def cmd_imagefsinfo(client: Client, args: argparse.Namespace) -> None:
    resp = client.image.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=args.timeout)
    print(json.dumps({"status": MessageToDict(resp)}, indent=2))


# --- wiring ---------------------------------------------------------------------------

#: A verb's implementation; it returns the exit status, or None for 0.
Verb = Callable[[Client, argparse.Namespace], int | None]
#: Registers a verb: (name, implementation, help, aliases) -> its argument parser.
AddVerb = Callable[[str, Verb, str, tuple[str, ...]], argparse.ArgumentParser]


class VerbParser(argparse.ArgumentParser):
    """Usage errors of a verb as one line: `cripy ctl VERB: INVALID_ARGUMENT: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: INVALID_ARGUMENT: {message}\n")


def add_parser(commands: Any) -> None:
    from cripy.cli import ctl_runtime, ctl_stream

    parser = commands.add_parser("ctl", help="a crictl-like CRI client")
    parser.add_argument("-r", "--runtime-endpoint",
                        default=os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT),
                        help=f"CRI endpoint (default {DEFAULT_ENDPOINT}, or ${ENDPOINT_ENV})")
    parser.add_argument("-i", "--image-endpoint", default=os.environ.get(IMAGE_ENDPOINT_ENV, ""),
                        help="image service endpoint (default: the runtime endpoint)")
    parser.add_argument("-t", "--timeout", type=float, default=10.0,
                        help="seconds to wait for a connection and for each query")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                  parser_class=VerbParser)

    def verb(name: str, func: Verb, help: str, aliases: tuple[str, ...] = ()
             ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = verbs.add_parser(name, help=help, aliases=list(aliases))
        sub.set_defaults(func=lambda args: run(func, args))
        return sub

    verb("version", cmd_version, "runtime name and version")
    verb("info", cmd_info, "runtime status and conditions")
    images = verb("images", cmd_images, "list images", ("img", "image"))
    images.add_argument("image", nargs="?", help="only this image (REPO[:TAG] or ID)")
    images.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    images.add_argument("--digests", action="store_true", help="show digests")
    images.add_argument("--no-trunc", action="store_true", help="full IDs and digests")
    images.add_argument("--pinned", action="store_true",
                        help="show whether each image is pinned ([image] pinned_images)")
    images.add_argument("-o", "--output", choices=["table", "json"], default="table")
    pull = verb("pull", cmd_pull, "pull an image")
    pull.add_argument("image")
    pull.add_argument("--creds", metavar="USER:PASS", help="registry credentials")
    pull.add_argument("--auth", metavar="AUTH", help="base64 of USER:PASS")
    inspecti = verb("inspecti", cmd_inspecti, "image status")
    inspecti.add_argument("images", nargs="+", metavar="IMAGE")
    inspecti.add_argument("-q", "--quiet", action="store_true", help="status only, no info")
    inspecti.add_argument("-o", "--output", choices=["json"], default="json")
    rmi = verb("rmi", cmd_rmi, "remove images")
    rmi.add_argument("images", nargs="*", metavar="IMAGE")
    rmi.add_argument("-a", "--all", action="store_true", help="remove every image")
    verb("imagefsinfo", cmd_imagefsinfo, "image filesystem usage")
    ctl_runtime.add_verbs(verb)
    ctl_stream.add_verbs(verb)


def fail(verb: str, code: str, message: str) -> int:
    print(f"cripy ctl {verb}: {code}: {one_line(message)}", file=sys.stderr)
    return 1


def run(func: Verb, args: argparse.Namespace) -> int:
    client = Client(args.runtime_endpoint, args.image_endpoint, args.timeout)
    try:
        status = func(client, args)
        sys.stdout.flush()
    except CtlError as exc:
        return fail(args.verb, exc.code, str(exc))
    except grpc.RpcError as exc:
        return fail(args.verb, *rpc_error(exc))
    except BrokenPipeError:  # e.g. `cripy ctl logs ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status or 0


def rpc_error(exc: grpc.RpcError) -> tuple[str, str]:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return code, details or code
