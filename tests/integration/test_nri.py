"""NRI plugins against a real daemon: the tests' plugin speaks the wire protocol (NRI's
multiplexer and ttrpc), in-process over the NRI socket, and as a pre-installed executable
that cripy starts from plugin_path with its config from plugin_config_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from cripy.api import api_pb2 as pb
from cripy.nri import api_pb2 as nri
from tests.support.daemon import Daemon
from tests.support.nri_plugin import NriPlugin
from tests.support.pods import Node, Pods, bridge_network, cgroup_dirs
from tests.support.registry import Registry

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
PREINSTALLED = "10-recorder"
REQUEST_TIMEOUT = 2.0


class Loop:
    """An event loop in a thread, for the in-process plugins of these (sync) tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def write_preinstalled(plugin_dir: Path, conf_dir: Path, record: Path,
                       behaviour: dict[str, Any]) -> None:
    """The tests' plugin as an executable `NN-name`, and its config (`name.conf`)."""
    plugin_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    script = plugin_dir / PREINSTALLED
    # NRI starts plugins with only its own variables: the wrapper brings the rest.
    script.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO}\n"
                      f"exec {sys.executable} -m tests.support.nri_plugin --record {record}\n")
    script.chmod(0o755)
    (conf_dir / "recorder.conf").write_text(json.dumps(behaviour))


def records(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def wait_until(check: Any, within: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {within}s")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
         images: Any) -> Iterator[Node]:
    """A node with NRI on and one pre-installed plugin (conftest's `pods` uses it), reading
    CDI specs from a directory of its own (`cdi`). The plugin's files live outside the
    daemon's directory, so the leak checks (which look for processes naming that
    directory) leave the plugin alone."""
    tmp = tmp_path_factory.mktemp("nri")
    write_preinstalled(tmp / "plugins", tmp / "conf", tmp / "record.jsonl",
                       {"events": "all"})
    (tmp / "cdi").mkdir()
    daemon = Daemon(tmp / "daemon", insecure_registries=[registry.host], extra_config=(
        f'[nri]\nenable = true\nplugin_path = "{tmp / "plugins"}"\n'
        f'plugin_config_path = "{tmp / "conf"}"\nrequest_timeout = {REQUEST_TIMEOUT}\n'
        f'registration_timeout = 5.0\n[cdi]\nspec_dirs = ["{tmp / "cdi"}"]\n'))
    with bridge_network(daemon.cni_dir, tmp, 112) as bridge, daemon:
        daemon.pull(images.busybox.ref)
        yield Node(daemon, bridge, images.busybox.ref, tmp)


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    running = Loop()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def plugins(node: Node, loop: Loop) -> Iterator[list[NriPlugin]]:
    """Connect in-process plugins with `connect(...)`; all are closed afterwards."""
    connected: list[NriPlugin] = []
    yield connected
    for plugin in connected:
        loop.run(plugin.close())


def connect(node: Node, loop: Loop, plugins: list[NriPlugin], plugin: NriPlugin,
            *, synchronized: bool = True) -> NriPlugin:
    socket_path = str(node.daemon.runroot / "nri.sock")
    loop.run(plugin.connect(socket_path))
    plugins.append(plugin)
    if synchronized:
        loop.run(asyncio.wait_for(plugin.synchronized.wait(), 10))
    return plugin


def typed(messages: list[Any], kind: type[T]) -> list[T]:
    assert all(isinstance(m, kind) for m in messages)
    return messages


def of_pod(plugin: NriPlugin, pod_id: str) -> list[tuple[str, Any]]:
    """The plugin's calls about one pod and its containers, in order."""
    out = []
    for name, request in zip(plugin.event_names(), (r for _, r in plugin.calls), strict=True):
        pod = getattr(request, "pod", None)
        if isinstance(pod, nri.PodSandbox) and pod.id == pod_id:
            out.append((name, request))
    return out


# --- the pre-installed plugin --------------------------------------------------------


def test_a_preinstalled_plugin_is_started_configured_and_synchronized(node: Node) -> None:
    seen = records(node.tmp / "record.jsonl")
    configure = next(r for r in seen if r["event"] == "Configure")
    assert configure["runtime_name"] == "cripy" and configure["runtime_version"]
    assert json.loads(configure["config"]) == {"events": "all"}  # recorder.conf
    assert any(r["event"] == "Synchronize" for r in seen)


def test_status_lists_the_active_plugins(node: Node) -> None:
    info = node.daemon.runtime.Status(pb.StatusRequest(verbose=True)).info
    (recorder,) = [p for p in json.loads(info["nri_plugins"]) if p["name"] == "recorder"]
    assert (recorder["index"], recorder["preinstalled"]) == ("10", True)


def test_a_crashed_preinstalled_plugin_is_restarted_and_resynchronized(pods: Pods) -> None:
    record = pods.node.tmp / "record.jsonl"
    pod_id = pods.run()
    wait_until(lambda: any(r["event"] == "RunPodSandbox" and r["pod"]["id"] == pod_id
                           for r in records(record)), what="RunPodSandbox recorded")
    old_pid = records(record)[-1]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    def resynchronized() -> dict[str, Any] | None:
        return next((r for r in records(record) if r["event"] == "Synchronize"
                     and r["pid"] != old_pid and pod_id in r["pods"]), None)

    again = wait_until(resynchronized, what="the restarted plugin's Synchronize")
    cid = pods.create(pod_id, "after-crash", ["sleep", "300"])
    wait_until(lambda: any(r["event"] == "StartContainer" and r["pid"] == again["pid"]
                           and r["container"]["id"] == cid for r in records(record)),
               what="events reach the restarted plugin")


def test_after_a_daemon_restart_plugins_see_the_recovered_state(pods: Pods) -> None:
    record = pods.node.tmp / "record.jsonl"
    pod_id = pods.run()
    cid = pods.create(pod_id, "survivor", ["sleep", "300"])
    before = len(records(record))
    pods.node.daemon.restart()
    seen = records(record)[before:]
    assert "Shutdown" in [r["event"] for r in seen]  # the old instance was told
    # cripy serves CRI only once its pre-installed plugins are synchronized
    sync = next(r for r in seen if r["event"] == "Synchronize")
    assert pod_id in sync["pods"] and cid in sync["containers"]
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING


# --- events ----------------------------------------------------------------------------


def test_events_reach_the_plugin_in_order_with_pod_and_container_metadata(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    plugin = connect(pods.node, loop, plugins, NriPlugin("observer", "50"))
    pod_id = pods.run(name="nri-events", labels={"app": "nri"})
    cid = pods.create(pod_id, "fails", ["sh", "-c", "exit 3"])
    assert pods.wait_exited(cid).exit_code == 3
    pods.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    pods.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    pods.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))  # again
    pods.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    loop.run(plugin.wait_for("RemovePodSandbox"))

    calls = of_pod(plugin, pod_id)
    assert [name for name, _ in calls] == [
        "RunPodSandbox", "CreateContainer", "ValidateContainerAdjustment",
        "PostCreateContainer", "StartContainer", "PostStartContainer", "StopContainer",
        "RemoveContainer", "StopPodSandbox", "RemovePodSandbox"]
    pod = calls[0][1].pod
    assert (pod.name, pod.namespace, pod.labels["app"]) == ("nri-events", "cripy-test", "nri")
    assert pod.ips and pod.linux.cgroup_parent == pods.cgroup_parent
    for name, request in calls[1:8]:
        assert (request.container.id, request.container.name,
                request.container.pod_sandbox_id) == (cid, "fails", pod_id), name
    assert calls[1][1].container.args == ["sh", "-c", "exit 3"]
    stopped = calls[6][1].container
    assert (stopped.state, stopped.exit_code) == (nri.CONTAINER_STOPPED, 3)


def test_update_container_resources_is_shown_to_plugins(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    plugin = connect(pods.node, loop, plugins, NriPlugin("updates", "50"))
    cid = pods.create(pods.run(), "updated", ["sleep", "300"])
    pods.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(cpu_shares=300)))
    (update,) = typed(loop.run(plugin.wait_for("UpdateContainer")),
                      nri.UpdateContainerRequest)
    assert update.container.id == cid and update.linux_resources.cpu.shares.value == 300
    loop.run(plugin.wait_for("PostUpdateContainer"))


def test_the_ordering_contract_as_plugins_see_it(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    """Not listed before the Run/Create hook returns; during StopPodSandbox's hook the
    containers are stopped and the pod is still there."""
    runtime = pods.runtime
    seen: dict[str, Any] = {}

    def listed_pods() -> list[str]:
        return [p.metadata.name for p in
                runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items]

    def listed_containers() -> list[str]:
        return [c.metadata.name for c in
                runtime.ListContainers(pb.ListContainersRequest()).containers]

    async def on_run(request: Any) -> nri.RunPodSandboxResponse:
        seen["pods during RunPodSandbox"] = await asyncio.to_thread(listed_pods)
        return nri.RunPodSandboxResponse()

    async def on_create(request: Any) -> nri.CreateContainerResponse:
        seen["containers during CreateContainer"] = await asyncio.to_thread(listed_containers)
        return nri.CreateContainerResponse()

    async def on_stop_pod(request: Any) -> nri.StopPodSandboxResponse:
        def query() -> tuple[Any, list[Any]]:
            status = runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(
                pod_sandbox_id=request.pod.id)).status
            states = [c.state for c in runtime.ListContainers(pb.ListContainersRequest(
                filter=pb.ContainerFilter(pod_sandbox_id=request.pod.id))).containers]
            return status, states
        seen["during StopPodSandbox"] = await asyncio.to_thread(query)
        return nri.StopPodSandboxResponse()

    plugin = NriPlugin("contract", "50")
    plugin.handlers.update({"RunPodSandbox": on_run, "CreateContainer": on_create,
                            "StopPodSandbox": on_stop_pod})
    connect(pods.node, loop, plugins, plugin)
    pod_id = pods.run(name="contract-pod")
    pods.create(pod_id, "contract-ctr", ["sleep", "300"])
    runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    assert "contract-pod" not in seen["pods during RunPodSandbox"]
    assert "contract-ctr" not in seen["containers during CreateContainer"]
    status, states = seen["during StopPodSandbox"]
    assert status.id == pod_id
    assert states == [pb.CONTAINER_EXITED]


def test_update_pod_sandbox_resources_reaches_plugins(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    plugin = connect(pods.node, loop, plugins, NriPlugin("pod-sizer", "50"))
    pod_id = pods.run()
    pods.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id, resources=pb.LinuxContainerResources(
            memory_limit_in_bytes=256 * 1024 * 1024)))
    (update,) = typed(loop.run(plugin.wait_for("UpdatePodSandbox")),
                      nri.UpdatePodSandboxRequest)
    assert update.pod.id == pod_id
    assert update.linux_resources.memory.limit.value == 256 * 1024 * 1024
    loop.run(plugin.wait_for("PostUpdatePodSandbox"))
    with pytest.raises(grpc.RpcError) as info:
        pods.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id="f" * 64))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# --- adjustments and updates ------------------------------------------------------------


def test_adjustments_are_visible_inside_the_container(
        pods: Pods, loop: Loop, plugins: list[NriPlugin], tmp_path: Path) -> None:
    shared = tmp_path / "from-plugin"
    shared.mkdir()
    (shared / "hello").write_text("injected by NRI\n")
    adjust = nri.ContainerAdjustment(env=[nri.KeyValue(key="NRI_INJECTED", value="yes")],
                                     mounts=[nri.Mount(destination="/nri", source=str(shared),
                                                       type="bind",
                                                       options=["rbind", "ro"])])
    adjust.linux.resources.memory.limit.value = 48 * 1024 * 1024
    connect(pods.node, loop, plugins, NriPlugin("adjuster", "40")).responses[
        "CreateContainer"] = nri.CreateContainerResponse(adjust=adjust)
    cid = pods.create(pods.run(), "adjusted", ["sleep", "300"])
    assert pods.exec(cid, "sh", "-c", "echo $NRI_INJECTED").stdout == b"yes\n"
    assert pods.exec(cid, "cat", "/nri/hello").stdout == b"injected by NRI\n"
    memory = next(p for p in cgroup_dirs(pods.cgroup_parent) if p.parent.name == "memory")
    (mem_dir,) = [d for d in memory.iterdir() if d.is_dir() and cid in d.name]
    assert int((mem_dir / "memory.limit_in_bytes").read_text()) == 48 * 1024 * 1024


def test_conflicting_adjustments_fail_the_create_naming_both_plugins(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    first = connect(pods.node, loop, plugins, NriPlugin("first", "60"))
    second = connect(pods.node, loop, plugins, NriPlugin("second", "70"))
    clash = nri.CreateContainerResponse(adjust=nri.ContainerAdjustment(
        env=[nri.KeyValue(key="SAME", value="x")]))
    first.responses["CreateContainer"] = second.responses["CreateContainer"] = clash
    pod_id = pods.run()
    with pytest.raises(grpc.RpcError) as info:
        pods.create(pod_id, "clash", ["sleep", "300"])
    assert "60-first" in str(info.value.details()) and "70-second" in str(info.value.details())
    assert not pods.runtime.ListContainers(pb.ListContainersRequest()).containers
    del second.responses["CreateContainer"]
    cid = pods.create(pod_id, "clash", ["sleep", "300"])  # the name is free again
    assert pods.exec(cid, "sh", "-c", "echo $SAME").stdout == b"x\n"


def test_a_validating_plugin_can_reject_the_merged_adjustments(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    adjuster = connect(pods.node, loop, plugins, NriPlugin("adjuster", "40"))
    adjuster.responses["CreateContainer"] = nri.CreateContainerResponse(
        adjust=nri.ContainerAdjustment(env=[nri.KeyValue(key="FORBIDDEN", value="1")]))
    validator = connect(pods.node, loop, plugins, NriPlugin("validator", "90"))

    def validate(request: Any) -> nri.ValidateContainerAdjustmentResponse:
        bad = any(kv.key == "FORBIDDEN" for kv in request.adjust.env)
        return nri.ValidateContainerAdjustmentResponse(reject=bad, reason="FORBIDDEN is set")

    validator.handlers["ValidateContainerAdjustment"] = validate
    pod_id = pods.run()
    with pytest.raises(grpc.RpcError) as info:
        pods.create(pod_id, "checked", ["sleep", "300"])
    assert "90-validator rejected" in str(info.value.details())
    assert "FORBIDDEN is set" in str(info.value.details())
    del adjuster.responses["CreateContainer"]
    pods.create(pod_id, "checked", ["sleep", "300"])


def test_unsolicited_updates_go_through_the_update_path(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    plugin = connect(pods.node, loop, plugins, NriPlugin("balancer", "50"))
    cid = pods.create(pods.run(), "balanced", ["sleep", "300"])
    update = nri.ContainerUpdate(container_id=cid)
    update.linux.resources.memory.limit.value = 80 * 1024 * 1024
    missing = nri.ContainerUpdate(container_id="0" * 64)
    missing.linux.resources.cpu.shares.value = 10
    reply = loop.run(plugin.update_containers(nri.UpdateContainersRequest(
        update=[update, missing])))
    assert [f.container_id for f in reply.failed] == ["0" * 64]
    status = pods.status(cid).status
    assert status.resources.linux.memory_limit_in_bytes == 80 * 1024 * 1024
    memory = next(p for p in cgroup_dirs(pods.cgroup_parent) if p.parent.name == "memory")
    (mem_dir,) = [d for d in memory.iterdir() if d.is_dir() and cid in d.name]
    assert int((mem_dir / "memory.limit_in_bytes").read_text()) == 80 * 1024 * 1024


def test_a_plugins_cdi_device_is_injected_into_the_container(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    spec_file = pods.node.tmp / "cdi" / "nri-test.json"
    spec_file.write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": "cripy.test/nri",
        "devices": [{"name": "null", "containerEdits": {
            "deviceNodes": [{"path": "/dev/nri-null", "hostPath": "/dev/null"}],
            "env": ["NRI_CDI=null"]}}]}))
    try:
        plugin = connect(pods.node, loop, plugins, NriPlugin("cdi", "45"))
        plugin.responses["CreateContainer"] = nri.CreateContainerResponse(
            adjust=nri.ContainerAdjustment(CDI_devices=[nri.CDIDevice(
                name="cripy.test/nri=null")]))
        pod_id = pods.run()
        cid = pods.create(pod_id, "with-device", ["sleep", "300"])
        null = os.stat("/dev/null")
        shown = pods.exec(cid, "stat", "-c", "%F %t %T", "/dev/nri-null")
        assert shown.stdout.decode().strip() == (
            f"character special file {os.major(null.st_rdev):x} {os.minor(null.st_rdev):x}")
        assert pods.exec(cid, "sh", "-c", "echo x > /dev/nri-null").exit_code == 0
        assert pods.exec(cid, "sh", "-c", "echo $NRI_CDI").stdout == b"null\n"
        assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
        (validate,) = typed(plugin.requests("ValidateContainerAdjustment"),
                            nri.ValidateContainerAdjustmentRequest)
        assert [d.name for d in validate.adjust.CDI_devices] == ["cripy.test/nri=null"]

        plugin.responses["CreateContainer"] = nri.CreateContainerResponse(
            adjust=nri.ContainerAdjustment(CDI_devices=[nri.CDIDevice(
                name="cripy.test/nri=gone")]))
        with pytest.raises(grpc.RpcError) as info:
            pods.create(pod_id, "unknown-device", ["sleep", "300"])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        details = str(info.value.details())
        assert "NRI plugin '45-cdi': CDI device not found: cripy.test/nri=gone" in details
        assert f"spec dirs searched: {pods.node.tmp / 'cdi'}" in details
        listed = pods.runtime.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers
        assert [c.metadata.name for c in listed] == ["with-device"]
        del plugin.responses["CreateContainer"]
        pods.create(pod_id, "unknown-device", ["sleep", "300"])  # the name is free again
    finally:
        spec_file.unlink()


# --- synchronization ---------------------------------------------------------------------


def test_a_plugin_connecting_later_is_synchronized_with_what_exists(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    pod_id = pods.run()
    cid = pods.create(pod_id, "existing", ["sleep", "300"])
    plugin = connect(pods.node, loop, plugins, NriPlugin("late", "80"))
    (sync,) = typed(plugin.requests("Synchronize"), nri.SynchronizeRequest)
    assert pod_id in [p.id for p in sync.pods]
    (shown,) = [c for c in sync.containers if c.id == cid]
    assert (shown.state, shown.pod_sandbox_id, shown.name) == \
        (nri.CONTAINER_RUNNING, pod_id, "existing")


def test_a_container_created_during_synchronize_is_not_lost(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    pod_id = pods.run()
    plugin = NriPlugin("slow-sync", "80")
    plugin.delays["Synchronize"] = 1.0
    connect(pods.node, loop, plugins, plugin, synchronized=False)
    loop.run(plugin.wait_for("Synchronize"))  # in progress now
    cid = pods.create(pod_id, "during-sync", ["sleep", "300"])
    loop.run(asyncio.wait_for(plugin.synchronized.wait(), 10))
    (sync,) = typed(plugin.requests("Synchronize"), nri.SynchronizeRequest)
    in_sync = cid in [c.id for c in sync.containers]
    created = [r.container.id for r in typed(plugin.requests("CreateContainer"),
                                             nri.CreateContainerRequest)]
    assert in_sync or cid in created
    loop.run(plugin.wait_for("StartContainer"))


# --- failures ------------------------------------------------------------------------------


def test_a_plugin_that_times_out_is_disconnected_and_the_call_goes_on(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    plugin = connect(pods.node, loop, plugins, NriPlugin("sluggish", "30"))
    plugin.delays["CreateContainer"] = REQUEST_TIMEOUT * 3
    pod_id = pods.run()
    started = time.monotonic()
    cid = pods.create(pod_id, "goes-on", ["sleep", "300"])
    assert time.monotonic() - started < REQUEST_TIMEOUT * 3
    loop.run(asyncio.wait_for(plugin.wait_closed(), 10))
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    assert "sluggish" in pods.node.daemon.log()


def test_a_hook_error_fails_the_call_and_leaves_nothing_behind(
        pods: Pods, loop: Loop, plugins: list[NriPlugin]) -> None:
    plugin = connect(pods.node, loop, plugins, NriPlugin("refuser", "20"))
    plugin.errors["RunPodSandbox"] = "no pods today"
    with pytest.raises(grpc.RpcError) as info:
        pods.run(name="refused-pod")
    assert "no pods today" in str(info.value.details())
    assert "20-refuser" in str(info.value.details())
    assert not [p for p in pods.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
                if p.metadata.name == "refused-pod"]
    del plugin.errors["RunPodSandbox"]
    pod_id = pods.run(name="refused-pod")  # a retry with the same name works

    plugin.errors["CreateContainer"] = "no containers either"
    with pytest.raises(grpc.RpcError) as info:
        pods.create(pod_id, "refused", ["sleep", "300"])
    assert "no containers either" in str(info.value.details())
    listed = pods.runtime.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers
    assert not listed
    del plugin.errors["CreateContainer"]
    cid = pods.create(pod_id, "refused", ["sleep", "300"])
    assert pods.status(cid).status.state == pb.CONTAINER_RUNNING
    # the leak check of the `pods` fixture: no mounts, processes, veths or cgroups left


def test_nri_off_serves_no_socket(tmp_path: Path, registry: Registry) -> None:
    daemon = Daemon(tmp_path / "daemon", insecure_registries=[registry.host])
    with daemon:
        assert not (daemon.runroot / "nri.sock").exists()
