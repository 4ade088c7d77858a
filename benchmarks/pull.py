"""Image pull time over the CRI, cripy against any other CRI runtimes, in one run.

Starts a local docker-registry and pushes a generated multi-layer gzip image (busybox
plus --layers layers, --size-mb MiB of content in all: "mixed" is half random bytes and
half text, compressing about as real images do; "random" does not compress). Then, for
--rounds rounds, each runtime in turn (the order rotates every round, so drift and noise
hit all alike) removes the image if present and pulls it through PullImage; the time of
the pull is recorded. It prints p50/p95 per runtime and the ratios against the first one.

Runtimes, in this order:
  - "cripy": this checkout's daemon, started in a temporary state dir;
  - --cripy NAME=PYTHON: another cripy started the same way with that interpreter (for
    instance another checkout's .venv/bin/python, to compare two versions);
  - --endpoint NAME=URL: any running CRI endpoint; it must be able to pull from the
    benchmark's registry over plain HTTP (fix its port with --registry-port);
  - "containerd": when Debian's containerd is installed (and not --no-containerd), a
    throwaway one with its own root (benchmarks/containerd.py).

Usage: python -m benchmarks.pull [--rounds 7] [--size-mb 60] [--layers 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from benchmarks import containerd
from benchmarks.cri_bench import percentile
from cripy.api import api_pb2 as pb
from cripy.api import api_pb2_grpc
from tests.support.daemon import Daemon
from tests.support.images import (
    ImageConfig,
    ImageSpec,
    Layer,
    busybox_rootfs_layer,
    files_layer,
    push_image,
)
from tests.support.registry import Registry

PULL_TIMEOUT = 600.0


@dataclass
class Runtime:
    name: str
    endpoint: str
    seconds: list[float] = field(default_factory=list)


def layer_content(kind: str, size: int, seed: int) -> dict[str, bytes]:
    """Files for one layer: `size` bytes, deterministic per seed."""
    rng = random.Random(seed)
    if kind == "random":
        return {f"data/{seed}/blob.bin": rng.randbytes(size)}
    words = [rng.randbytes(rng.randint(2, 6)).hex() for _ in range(4096)]
    text = bytearray()
    while len(text) < size // 2:
        text += " ".join(rng.choices(words, k=2000)).encode() + b"\n"
    return {f"data/{seed}/blob.bin": rng.randbytes(size - size // 2),
            f"data/{seed}/text.txt": bytes(text[: size // 2])}


def push_bench_image(registry: Registry, size_mb: int, layers: int, kind: str) -> str:
    per_layer = size_mb * 1024 * 1024 // max(1, layers)
    spec = ImageSpec([Layer(busybox_rootfs_layer())] + [
        Layer(files_layer(layer_content(kind, per_layer, seed)), "gzip", level=6)
        for seed in range(layers)], ImageConfig(cmd=["sh"]))
    return push_image(registry, "pullbench", f"{kind}-{size_mb}m-{layers}l", spec).ref


def remove_if_present(images: api_pb2_grpc.ImageServiceStub, ref: str) -> None:
    spec = pb.ImageSpec(image=ref)
    if images.ImageStatus(pb.ImageStatusRequest(image=spec), timeout=60).image.id:
        images.RemoveImage(pb.RemoveImageRequest(image=spec), timeout=120)


def timed_pull(endpoint: str, ref: str) -> float:
    with grpc.insecure_channel(endpoint) as channel:
        images = api_pb2_grpc.ImageServiceStub(channel)
        remove_if_present(images, ref)
        started = time.perf_counter()
        images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)),
                         timeout=PULL_TIMEOUT)
        elapsed = time.perf_counter() - started
        remove_if_present(images, ref)
    return elapsed


def named(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, rest


@contextmanager
def runtimes(args: argparse.Namespace, workdir: Path, registry: Registry) -> Iterator[
        list[Runtime]]:
    with ExitStack() as stack:
        found = []
        for name, python in [("cripy", ""), *args.cripy]:
            daemon = Daemon(workdir / name, insecure_registries=[registry.host], python=python)
            stack.enter_context(daemon)
            found.append(Runtime(name, daemon.endpoint))
        found += [Runtime(name, endpoint) for name, endpoint in args.endpoint]
        if containerd.available() and not args.no_containerd:
            endpoint = stack.enter_context(containerd.containerd(
                workdir / "containerd", registry, workdir / "cni"))
            found.append(Runtime("containerd", endpoint))
        yield found


def report(found: list[Runtime], rounds: int, what: str) -> None:
    print(f"pull of {what}: {rounds} rounds, interleaved (removed before each pull)")
    first = found[0]
    base50 = statistics.median(first.seconds)
    base95 = percentile(first.seconds, 0.95)
    for r in found:
        p50, p95 = statistics.median(r.seconds), percentile(r.seconds, 0.95)
        ratio = "" if r is first else \
            f"   {first.name}/{r.name}: p50 {base50 / p50:.2f}  p95 {base95 / p95:.2f}"
        print(f"  {r.name:12s} p50 {p50 * 1000:7.0f} ms  p95 {p95 * 1000:7.0f} ms  "
              f"min {min(r.seconds) * 1000:7.0f} ms{ratio}")
    for r in found:
        print(f"  {r.name:12s} rounds (ms): "
              + " ".join(f"{s * 1000:.0f}" for s in r.seconds))


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming the runtimes to measure, shared by the benchmarks."""
    parser.add_argument("--cripy", type=named, action="append", default=[],
                        metavar="NAME=PYTHON", help="another cripy, run by that interpreter")
    parser.add_argument("--endpoint", type=named, action="append", default=[],
                        metavar="NAME=URL", help="another running CRI endpoint to measure")
    parser.add_argument("--no-containerd", action="store_true",
                        help="do not measure Debian's containerd even when installed")
    parser.add_argument("--registry-port", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size-mb", type=int, default=60)
    parser.add_argument("--layers", type=int, default=6,
                        help="content layers, on top of a busybox layer")
    parser.add_argument("--content", choices=["mixed", "random"], default="mixed")
    add_runtime_arguments(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cripy-bench-") as tmp, \
            Registry(port=args.registry_port) as registry:
        workdir = Path(tmp)
        (workdir / "cni").mkdir()
        ref = push_bench_image(registry, args.size_mb, args.layers, args.content)
        print(f"image {ref} on registry {registry.host}")
        with runtimes(args, workdir, registry) as found:
            for r in found:
                timed_pull(r.endpoint, ref)  # warm-up: page cache, imports, connections
            for i in range(args.rounds):
                shift = i % len(found)
                for r in found[shift:] + found[:shift]:
                    r.seconds.append(timed_pull(r.endpoint, ref))
    what = (f"{args.size_mb} MiB of {args.content} content in {args.layers} gzip layers "
            "+ busybox")
    report(found, args.rounds, what)


if __name__ == "__main__":
    main()
