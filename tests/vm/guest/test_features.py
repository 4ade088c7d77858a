"""What Status reports per handler on the VM's usual node: its state is on tmpfs, which
Linux 6.1 cannot idmap, so no handler offers user namespaces there (test_userns.py has a
node on ext4 where crun does)."""

from __future__ import annotations

import json

import pytest

from cripy.api import api_pb2 as pb
from tests.vm.guest.node import GuestPods


# One driver: handler features depend on the handlers and the filesystem, not the driver.
@pytest.mark.drivers("cgroupfs")
def test_handlers_report_the_truth_for_this_node(pods: GuestPods) -> None:
    status = pods.runtime.Status(pb.StatusRequest(verbose=True))
    found = {h.name: h.features for h in status.runtime_handlers}
    assert set(found) == {"", "runc", "crun"}
    assert all(f.recursive_read_only_mounts for f in found.values())
    assert not any(f.user_namespaces for f in found.values())
    reasons = {h["name"]: h["features"]["user_namespaces"]["reason"]
               for h in json.loads(status.info["runtime_handlers"])}
    assert "cannot be idmapped on Linux 6.1" in reasons["crun"]
    assert "no idmapped mounts" in reasons["runc"]
    assert status.features.supplemental_groups_policy
