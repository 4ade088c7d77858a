"""Pod user namespace options (cripy.oci.userns) and handler features (cripy.oci.features):
validation and the decisions made from the probed facts."""

from __future__ import annotations

import pytest

from cripy.api import api_pb2 as pb
from cripy.errors import FailedPreconditionError, InvalidArgumentError
from cripy.oci.features import KernelFeatures, RuntimeFeatures, combine, runtime_features
from cripy.oci.idmap import IDMap
from cripy.oci.userns import PodUserns, check_handler, container_userns, pod_userns

M = pb.IDMapping


def config(mode: pb.NamespaceMode = pb.POD, uids: list[pb.IDMapping] | None = None,
           gids: list[pb.IDMapping] | None = None, set_options: bool = True
           ) -> pb.PodSandboxConfig:
    c = pb.PodSandboxConfig()
    nso = c.linux.security_context.namespace_options
    if set_options:
        default = [M(host_id=100000, container_id=0, length=65536)]
        nso.userns_options.CopyFrom(pb.UserNamespace(
            mode=mode, uids=default if uids is None else uids,
            gids=default if gids is None else gids))
    return c


def test_pod_userns_reads_the_mappings() -> None:
    userns = pod_userns(config(uids=[M(host_id=100000, container_id=0, length=1000),
                                     M(host_id=300000, container_id=1000, length=64536)]))
    assert userns is not None
    assert userns.uids == (IDMap(0, 100000, 1000), IDMap(1000, 300000, 64536))
    assert userns.host_root() == (100000, 100000)


def test_node_and_unset_mean_the_node_user_namespace() -> None:
    assert pod_userns(config(set_options=False)) is None
    assert pod_userns(config(mode=pb.NODE, uids=[], gids=[])) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": pb.CONTAINER}, "mode CONTAINER is not supported"),
    ({"gids": []}, "needs gid mappings"),
    ({"uids": [M(host_id=5, container_id=0, length=0)]}, "length 0"),
    ({"uids": [M(host_id=100, container_id=0, length=10), M(host_id=500, container_id=5,
                                                           length=10)]},
     "overlap in container ids at 5"),
    ({"uids": [M(host_id=100, container_id=0, length=1)] * 341}, "at most 340"),
])
def test_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        pod_userns(config(**kwargs))  # type: ignore[arg-type]


def test_a_handler_without_the_feature_refuses_with_its_reason() -> None:
    userns = PodUserns((IDMap(0, 1, 2),), (IDMap(0, 1, 2),))
    with pytest.raises(FailedPreconditionError, match="'runc' cannot run pods in a user "
                                                      "namespace here .*: no idmap"):
        check_handler(userns, "runc", False, "no idmap")
    check_handler(userns, "crun", True, "")
    check_handler(None, "runc", False, "no idmap")  # no user namespace asked for


def test_container_options_must_match_the_pod() -> None:
    userns = PodUserns((IDMap(0, 1, 2),), (IDMap(0, 1, 2),))
    pod_mode = pb.NamespaceOption(userns_options=pb.UserNamespace(mode=pb.POD))
    node_mode = pb.NamespaceOption(userns_options=pb.UserNamespace(mode=pb.NODE))
    container_userns(pod_mode, userns)
    container_userns(node_mode, None)
    container_userns(pb.NamespaceOption(), userns)
    with pytest.raises(InvalidArgumentError, match="its pod has no user namespace"):
        container_userns(pod_mode, None)
    with pytest.raises(InvalidArgumentError, match="its pod runs in a user namespace"):
        container_userns(node_mode, userns)


def test_features_need_a_usable_handler_the_kernel_and_the_runtime() -> None:
    kernel = KernelFeatures(recursive_read_only="", idmapped_layers="tmpfs cannot")
    runtime = RuntimeFeatures(rro_option="", idmapped_mounts="runc 1.1 has none")
    both = combine("", kernel, runtime)
    assert both.recursive_read_only.supported
    assert not both.user_namespaces.supported
    assert both.user_namespaces.reason == "tmpfs cannot; runc 1.1 has none"
    broken = combine("hybrid cgroups", KernelFeatures("", ""), RuntimeFeatures("", ""))
    assert not broken.recursive_read_only.supported
    assert "unusable here: hybrid cgroups" in broken.user_namespaces.reason


def test_crun_without_a_features_command_is_judged_by_its_version() -> None:
    # A path that cannot run: no `features` answer, so the version facts decide.
    assert runtime_features("/nonexistent/crun", "crun", "1.8.1") == RuntimeFeatures("", "")
    old = runtime_features("/nonexistent/crun", "crun", "1.3")
    assert "predates the 'rro'" in old.rro_option and "predates idmapped" in old.idmapped_mounts
    other = runtime_features("/nonexistent/kata", "kata", "3.0")
    assert "no 'features' command" in other.rro_option
