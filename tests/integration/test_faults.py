"""Faults: a missing or failing runc or conmon, a full disk, CNI plugins that fail or hang.

Each gets a clear error, leaves no half-made object behind, and the daemon keeps serving.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cripy.api import api_pb2 as pb
from tests.support.daemon import Daemon
from tests.support.images import push_big_image
from tests.support.pods import Node, Pods, bridge_network, leftovers, remove_cgroup
from tests.support.registry import Registry

_octets = iter(range(100, 140))


@contextmanager
def faulty_node(tmp_path: Path, registry: Registry, images: Any, extra_config: str = "",
                conflist: str | None = None) -> Iterator[Pods]:
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host],
                    extra_config=extra_config)
    with bridge_network(daemon.cni_dir, tmp_path, next(_octets)) as bridge:
        if conflist is not None:
            (daemon.cni_dir / "10-test.conflist").write_text(conflist)
        with daemon:
            pods = Pods(Node(daemon, bridge, images.busybox.ref, tmp_path), tmp_path / "logs")
            try:
                daemon.pull(images.busybox.ref)
                yield pods
            finally:
                pods.created = [p.id for p in daemon.runtime.ListPodSandbox(
                    pb.ListPodSandboxRequest()).items]
                pods.cleanup()
                leaks = leftovers(daemon, bridge, pods.cgroup_parent)
                remove_cgroup(pods.cgroup_parent)
                assert leaks == [], leaks
        assert daemon.process is not None and daemon.process.returncode == 0


def expect_error(call: Any, *needles: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
                          grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.RESOURCE_EXHAUSTED), err
    for needle in needles:
        assert needle in (err.details() or ""), err.details()
    return err


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def assert_no_containers(pods: Pods) -> None:
    listed = pods.runtime.ListContainers(pb.ListContainersRequest()).containers
    assert list(listed) == []


@pytest.mark.parametrize("which", ["runtime_path", "conmon_path"])
def test_a_missing_runc_or_conmon(tmp_path: Path, registry: Registry, images: Any,
                                  which: str) -> None:
    missing = f"/nonexistent/{which}"
    with faulty_node(tmp_path, registry, images, f'[runtime]\n{which} = "{missing}"\n') as pods:
        conditions = {c.type: c for c in pods.runtime.Status(pb.StatusRequest()).status.conditions}
        assert not conditions["RuntimeReady"].status
        assert missing in conditions["RuntimeReady"].message
        pod_id = pods.run("nobin")
        expect_error(lambda: pods.create(pod_id, "c", ["true"]), missing)
        assert_no_containers(pods)


def test_a_failing_runc(tmp_path: Path, registry: Registry, images: Any) -> None:
    wrapper = script(tmp_path / "runc", 'for a in "$@"; do [ "$a" = create ] && '
                     '{ echo "injected runc failure" >&2; exit 1; }; done\n'
                     'exec /usr/sbin/runc "$@"\n')
    with faulty_node(tmp_path, registry, images, f'[runtime]\nruntime_path = "{wrapper}"\n'
                     ) as pods:
        pod_id = pods.run("badrunc")
        expect_error(lambda: pods.create(pod_id, "c", ["true"]), "injected runc failure")
        assert_no_containers(pods)
        assert pods.runtime.Version(pb.VersionRequest()).runtime_name == "cripy"


def failing_conflist(plugin: str) -> str:
    return ('{"cniVersion": "1.0.0", "name": "faulty", "plugins": '
            f'[{{"type": "{plugin}"}}]}}')


def test_a_failing_cni_plugin(tmp_path: Path, registry: Registry, images: Any) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    script(plugins / "cripy-fail", 'echo \'{"cniVersion": "1.0.0", "code": 11, '
           '"msg": "injected plugin failure"}\'\nexit 1\n')
    config = f'[network]\ncni_plugin_dirs = ["{plugins}", "/usr/lib/cni"]\n'
    with faulty_node(tmp_path, registry, images, config,
                     conflist=failing_conflist("cripy-fail")) as pods:
        expect_error(lambda: pods.run("cnifail"), "injected plugin failure")
        assert list(pods.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []


def test_a_hanging_cni_plugin(tmp_path: Path, registry: Registry, images: Any) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    script(plugins / "cripy-hang", "exec sleep 600\n")
    config = (f'[network]\ncni_plugin_dirs = ["{plugins}", "/usr/lib/cni"]\n'
              "plugin_timeout = 2\n")
    with faulty_node(tmp_path, registry, images, config,
                     conflist=failing_conflist("cripy-hang")) as pods:
        err = expect_error(lambda: pods.run("cnihang"), "cripy-hang")
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert list(pods.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
        hung = subprocess.run(["pgrep", "-f", "sleep 600"], capture_output=True, text=True)
        assert hung.stdout.strip() == ""


def test_a_full_disk_on_the_root_dir(tmp_path: Path, registry: Registry) -> None:
    ref = push_big_image(registry, total_mb=24, layers=3, repo="toobig")
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host])
    daemon.root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "cripy-full", str(daemon.root)],
                   check=True)
    try:
        with daemon:
            err = expect_error(lambda: daemon.pull(ref))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert list(daemon.images.ListImages(pb.ListImagesRequest()).images) == []
            assert list((daemon.root / "image" / "layers").iterdir()) == []
            assert list((daemon.root / "image" / "tmp").iterdir()) == []
            assert daemon.runtime.Version(pb.VersionRequest()).runtime_name == "cripy"
    finally:
        subprocess.run(["umount", str(daemon.root)], check=True)
