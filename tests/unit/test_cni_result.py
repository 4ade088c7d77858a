"""CNI config lists, per-plugin stdin, results and errors: pure, no plugins run."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cripy.network.cni_result import (
    CNIFormatError,
    build_cni_args,
    build_plugin_config,
    config_list_from_dict,
    parse_config_list,
    parse_error,
    parse_result,
    result_from_dict,
    supports_prev_result_on_del,
    valid_container_id,
    valid_ifname,
)

CONFLIST: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "podnet",
    "plugins": [
        {"type": "bridge", "bridge": "cni0",
         "ipam": {"type": "host-local", "subnet": "10.213.0.0/24"}},
        {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}},
    ],
}

RESULT_100: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"address": "fd00:213::5/64", "gateway": "fd00:213::1", "interface": 2},
        {"address": "10.213.0.5/24", "gateway": "10.213.0.1", "interface": 2},
        {"address": "10.213.0.1/24", "interface": 0},  # host side: not a pod IP
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.213.0.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.213.0.1"], "domain": "cluster.local",
            "search": ["a.local"], "options": ["ndots:5"]},
}


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --- config lists -------------------------------------------------------------------------


def test_a_conflist_keeps_its_plugins_in_order() -> None:
    conf = parse_config_list(encode(CONFLIST), "/etc/cni/net.d/10.conflist")
    assert (conf.name, conf.cni_version) == ("podnet", "1.0.0")
    assert conf.plugin_types == ["bridge", "portmap"]
    assert conf.raw == CONFLIST and not conf.disable_check


def test_a_single_conf_becomes_a_one_plugin_list() -> None:
    single = {"cniVersion": "0.4.0", "name": "one", "type": "bridge", "bridge": "b0"}
    conf = parse_config_list(encode(single))
    assert conf.plugin_types == ["bridge"] and conf.plugins[0]["bridge"] == "b0"
    assert conf.cni_version == "0.4.0"


def test_disable_check_may_be_a_string() -> None:
    assert config_list_from_dict({**CONFLIST, "disableCheck": "true"}).disable_check
    assert config_list_from_dict({**CONFLIST, "disableCheck": True}).disable_check


@pytest.mark.parametrize("broken, words", [
    (b"{not json", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (encode({**CONFLIST, "name": ""}), "network name"),
    (encode({**CONFLIST, "name": "a/b"}), "network name"),
    (encode({**CONFLIST, "cniVersion": 1}), "cniVersion"),
    (encode({**CONFLIST, "plugins": []}), "non-empty list"),
    (encode({**CONFLIST, "plugins": [{"type": "../../bin/sh"}]}), "type"),
    (encode({**CONFLIST, "plugins": [{"bridge": "x"}]}), "type"),
    (encode({**CONFLIST, "plugins": ["bridge"]}), "not a JSON object"),
    (encode({**CONFLIST, "plugins": [{"type": "x", "capabilities": []}]}), "capabilities"),
])
def test_invalid_configs_are_refused_with_the_reason(broken: bytes, words: str) -> None:
    with pytest.raises(CNIFormatError, match=words) as info:
        parse_config_list(broken, "/etc/cni/net.d/bad.conflist")
    assert "/etc/cni/net.d/bad.conflist" in str(info.value)


# --- per-plugin stdin ---------------------------------------------------------------------


def test_plugin_config_gets_the_list_name_version_and_prev_result() -> None:
    conf = config_list_from_dict(CONFLIST)
    plugin = {**conf.plugins[0], "name": "other", "cniVersion": "0.3.1"}
    data = json.loads(build_plugin_config(conf, plugin, RESULT_100, {}))
    assert data["name"] == "podnet" and data["cniVersion"] == "1.0.0"
    assert data["prevResult"] == RESULT_100
    assert data["bridge"] == "cni0" and data["ipam"]["type"] == "host-local"
    assert "runtimeConfig" not in data


def test_first_plugin_has_no_prev_result() -> None:
    conf = config_list_from_dict(CONFLIST)
    assert "prevResult" not in json.loads(build_plugin_config(conf, conf.plugins[0], None, {}))


def test_runtime_config_only_carries_declared_capabilities() -> None:
    conf = config_list_from_dict(CONFLIST)
    offered = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
               "bandwidth": {"ingressRate": 1}, "ipRanges": []}
    portmap = json.loads(build_plugin_config(conf, conf.plugins[1], RESULT_100, offered))
    assert portmap["runtimeConfig"] == {"portMappings": offered["portMappings"]}
    bridge = json.loads(build_plugin_config(conf, conf.plugins[0], None, offered))
    assert "runtimeConfig" not in bridge


def test_building_does_not_change_the_list() -> None:
    conf = config_list_from_dict(json.loads(json.dumps(CONFLIST)))
    build_plugin_config(conf, conf.plugins[1], RESULT_100, {"portMappings": []})
    assert conf.plugins == CONFLIST["plugins"]


def test_prev_result_on_del_and_check_from_040() -> None:
    assert not supports_prev_result_on_del("0.3.1")
    assert supports_prev_result_on_del("0.4.0") and supports_prev_result_on_del("1.0.0")
    assert supports_prev_result_on_del("1.1.0")


# --- environment --------------------------------------------------------------------------


def test_cni_args_are_joined_and_separators_refused() -> None:
    assert build_cni_args([("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web-0")]) == \
        "IgnoreUnknown=1;K8S_POD_NAME=web-0"
    with pytest.raises(ValueError):
        build_cni_args([("K8S_POD_NAME", "x;IP=10.0.0.9")])
    with pytest.raises(ValueError):
        build_cni_args([("A=B", "1")])


@pytest.mark.parametrize("value, ok", [
    ("abc123", True), ("a" * 64, True), ("a.b_c-d", True),
    ("", False), ("-abc", False), ("../etc", False), ("a/b", False), ("a b", False),
])
def test_container_ids(value: str, ok: bool) -> None:
    assert valid_container_id(value) is ok


@pytest.mark.parametrize("value, ok", [
    ("eth0", True), ("lo", True), ("a" * 15, True),
    ("", False), ("a" * 16, False), (".", False), ("..", False), ("e/0", False),
    ("e:0", False), ("e 0", False),
])
def test_interface_names(value: str, ok: bool) -> None:
    assert valid_ifname(value) is ok


# --- results ------------------------------------------------------------------------------


def test_a_100_result_is_parsed_whole() -> None:
    result = parse_result(encode(RESULT_100))
    assert result.cni_version == "1.0.0"
    assert [i.name for i in result.interfaces] == ["cni0", "veth1", "eth0"]
    assert result.interfaces[2].sandbox == "/run/netns/x"
    assert str(result.ips[1].address) == "10.213.0.5/24"
    assert str(result.ips[1].gateway) == "10.213.0.1" and result.ips[1].interface == 2
    assert [str(r.dst) for r in result.routes] == ["0.0.0.0/0", "::/0"]
    assert result.dns.nameservers == ["10.213.0.1"] and result.dns.search == ["a.local"]
    assert result.raw == RESULT_100


def test_pod_ips_are_sandbox_addresses_ipv4_first() -> None:
    result = result_from_dict(RESULT_100)
    assert result.pod_ips() == ["10.213.0.5", "fd00:213::5"]
    assert result.pod_ips("eth0") == ["10.213.0.5", "fd00:213::5"]
    assert result.pod_ips("net1") == []


def test_ips_without_interface_index_count_once() -> None:
    result = result_from_dict({"cniVersion": "1.0.0", "ips": [
        {"address": "10.1.0.2/16"}, {"address": "10.1.0.2/24"}]})
    assert result.pod_ips() == ["10.1.0.2"]


def test_a_040_result_with_versions() -> None:
    obj = {"cniVersion": "0.4.0",
           "interfaces": [{"name": "eth0", "sandbox": "/proc/1/ns/net"}],
           "ips": [{"version": "6", "address": "fd00::2/64", "interface": 0},
                   {"version": "4", "address": "10.9.0.2/24", "gateway": "10.9.0.1",
                    "interface": 0}]}
    assert result_from_dict(obj).pod_ips() == ["10.9.0.2", "fd00::2"]


def test_a_031_result_may_leave_out_the_ip_version() -> None:
    # What the loopback plugin of containernetworking-plugins 1.x prints for 0.3.1.
    obj = {"cniVersion": "0.3.1",
           "interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "sandbox": "/x"}],
           "ips": [{"interface": 0, "address": "127.0.0.1/8"},
                   {"interface": 0, "address": "::1/128"}], "dns": {}}
    assert result_from_dict(obj).pod_ips("lo") == ["127.0.0.1", "::1"]


def test_a_legacy_020_result_is_read_into_ips() -> None:
    obj = {"cniVersion": "0.2.0",
           "ip4": {"ip": "10.5.0.7/16", "gateway": "10.5.0.1",
                   "routes": [{"dst": "0.0.0.0/0"}]},
           "ip6": {"ip": "fd05::7/64"}, "dns": {"nameservers": ["10.5.0.1"]}}
    result = result_from_dict(obj)
    assert result.pod_ips() == ["10.5.0.7", "fd05::7"]
    assert str(result.ips[0].gateway) == "10.5.0.1"
    assert [str(r.dst) for r in result.routes] == ["0.0.0.0/0"]


@pytest.mark.parametrize("obj, words", [
    ([], "not a JSON object"),
    ({"cniVersion": "9.9.9", "ips": []}, "not supported"),
    ({"cniVersion": "1.0.0", "ips": {}}, "ips is not a list"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1"}]}, "CIDR"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "banana/24"}]}, "CIDR"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "gateway": 7}]},
     "gateway"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 0}]},
     "not an index"),
    ({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
      "ips": [{"address": "10.0.0.2/24", "interface": True}]}, "not an index"),
    ({"cniVersion": "0.4.0", "ips": [{"version": "6", "address": "10.0.0.2/24"}]},
     "does not match"),
    ({"cniVersion": "0.4.0", "ips": [{"version": 4, "address": "10.0.0.2/24"}]},
     "version"),
    ({"cniVersion": "1.0.0", "interfaces": [{"mac": "x"}]}, "has no name"),
    ({"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]}, "has no dst"),
    ({"cniVersion": "1.0.0", "routes": [{"dst": "nowhere"}]}, "CIDR"),
    ({"cniVersion": "1.0.0", "dns": {"nameservers": "10.0.0.1"}}, "nameservers"),
    ({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.1"}}, "CIDR"),
])
def test_malformed_results_are_refused_clearly(obj: Any, words: str) -> None:
    with pytest.raises(CNIFormatError, match=words):
        result_from_dict(obj)


@pytest.mark.parametrize("data", [b"", b"  \n", b"{", b"\xff\xfe"])
def test_output_that_is_not_json_is_refused(data: bytes) -> None:
    with pytest.raises(CNIFormatError):
        parse_result(data)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.sampled_from(["1.0.0", "0.4.0", "0.2.0", "10.0.0.1/8", "4", "::1", "eth0"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["cniVersion", "ips", "interfaces", "routes", "dns",
                                       "address", "gateway", "interface", "version",
                                       "name", "dst", "gw", "ip4", "ip", "nameservers"]),
                      inner, max_size=5),
    max_leaves=20)


@given(_json)
def test_any_json_gives_a_result_or_a_format_error(obj: Any) -> None:
    with contextlib.suppress(CNIFormatError):
        result_from_dict(obj)


# --- errors -------------------------------------------------------------------------------


def test_the_spec_error_on_stdout() -> None:
    out = encode({"cniVersion": "1.0.0", "code": 7, "msg": "bad config",
                  "details": "field bridge is required"})
    error = parse_error(out, b"some log line\n", 1)
    assert (error.code, error.msg, error.details) == (7, "bad config",
                                                      "field bridge is required")
    assert error.is_config_error
    assert str(error) == "bad config (field bridge is required) [code 7]"


def test_the_error_json_may_come_on_stderr() -> None:
    error = parse_error(b"", encode({"code": 11, "msg": "try again later"}), 1)
    assert error.code == 11 and not error.is_config_error


def test_plain_text_errors_are_kept_short() -> None:
    error = parse_error(b"", b"panic: " + b"x" * 2000, 2)
    assert error.code is None and error.msg.startswith("...") and len(error.msg) < 600
    assert parse_error(b"", b"", 3).msg == "exited with status 3"
