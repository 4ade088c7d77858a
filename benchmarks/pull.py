"""Pull throughput: `cripy` PullImage against `skopeo copy` of the same image.

Starts a local docker-registry, pushes a multi-layer image of random (incompressible)
data, then alternates timed runs of
  - cripy: PullImage over the CRI socket (download, verify, unpack), then RemoveImage;
  - skopeo: `skopeo copy docker://... oci:DIR` (download and verify, no unpacking)
and prints the medians and their ratio. Usage: python -m benchmarks.pull [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.images import push_big_image
from tests.support.registry import Registry


def time_cripy_pull(daemon: Daemon, ref: str) -> float:
    started = time.perf_counter()
    image_id = daemon.pull(ref)
    elapsed = time.perf_counter() - started
    daemon.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))
    return elapsed


def time_skopeo_copy(ref: str, workdir: Path) -> float:
    with tempfile.TemporaryDirectory(dir=workdir) as target:
        started = time.perf_counter()
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
             f"docker://{ref}", f"oci:{target}/layout:bench"],
            check=True,
        )
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size-mb", type=int, default=60)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cripy-bench-") as tmp, Registry() as registry:
        workdir = Path(tmp)
        ref = push_big_image(registry, total_mb=args.size_mb, layers=args.layers)
        with Daemon(workdir / "daemon", insecure_registries=[registry.host]) as daemon:
            time_cripy_pull(daemon, ref)  # warm-up: page cache, imports, connections
            time_skopeo_copy(ref, workdir)
            cripy_runs, skopeo_runs = [], []
            for _ in range(args.runs):
                cripy_runs.append(time_cripy_pull(daemon, ref))
                skopeo_runs.append(time_skopeo_copy(ref, workdir))
    cripy_median = statistics.median(cripy_runs)
    skopeo_median = statistics.median(skopeo_runs)
    print(f"image: {args.size_mb} MiB random data in {args.layers} gzip layers + busybox, "
          f"{args.runs} runs each")
    print(f"cripy pull (download+verify+unpack): median {cripy_median:.3f}s "
          f"(min {min(cripy_runs):.3f}s, max {max(cripy_runs):.3f}s)")
    print(f"skopeo copy to oci dir (download):   median {skopeo_median:.3f}s "
          f"(min {min(skopeo_runs):.3f}s, max {max(skopeo_runs):.3f}s)")
    print(f"ratio cripy/skopeo: {cripy_median / skopeo_median:.2f}")


if __name__ == "__main__":
    main()
