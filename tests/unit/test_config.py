from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cripy import config as config_mod
from cripy.config import (
    Config,
    ConfigError,
    load,
    load_files,
    node_config_files,
    render,
    render_default,
)


def test_default_config_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "cripy.toml"
    path.write_text(render_default())
    assert load(path) == Config()


def test_default_config_is_commented_and_complete() -> None:
    text = render_default()
    data = tomllib.loads(text)
    assert data["root"] == "/var/lib/cripy"
    assert data["listen"] == "unix:///run/cripy/cripy.sock"
    assert set(data) >= {"root", "runroot", "listen", "log_level", "image", "runtime", "network"}
    assert text.count("\n# ") >= 8


def test_registries_load_and_render(tmp_path: Path) -> None:
    path = tmp_path / "cripy.toml"
    path.write_text('[registries."127.0.0.1:5000"]\ninsecure = true\n'
                    'mirrors = ["http://127.0.0.1:5001"]\n')
    config = load(path)
    assert config.is_insecure("127.0.0.1:5000")
    assert not config.is_insecure("docker.io")
    assert config.registries["127.0.0.1:5000"].mirrors == ["http://127.0.0.1:5001"]
    path.write_text(render(config))
    assert load(path) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n", "unknown config key colour"),
        ("[image]\npull_concurency = 2\n", "unknown config key image.pull_concurency"),
        ("root = 5\n", "root: expected a string, got an integer"),
        ("[image]\npull_concurrency = \"3\"\n", "image.pull_concurrency: expected an integer"),
        ("[network]\ncni_plugin_dirs = \"/x\"\n", "network.cni_plugin_dirs: expected a list"),
        ('[registries."r"]\ninsecure = "yes"\n', "registries.r.insecure: expected a boolean"),
        ('log_level = "loud"\n', "log_level: must be one of"),
        ('listen = "tcp://1.2.3.4:1"\n', "only unix:// endpoints"),
        ("root = \n", "config file"),
        ('[nri]\nsocket_path = "nri.sock"\n', "nri.socket_path: must be an absolute path"),
        ("[nri]\nrequest_timeout = 0\n", "nri.request_timeout: must be positive"),
        ("[nri]\nenable = 1\n", "nri.enable: expected a boolean"),
        ('[nri]\nsocket_path = "/' + "s" * 120 + '"\n', "longer than a unix socket"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cripy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_nri_defaults_are_the_anchors_ones() -> None:
    nri = load(None).nri
    assert nri.enable and nri.allow_external_plugins
    assert nri.socket_path == "/var/run/nri/nri.sock"
    assert (nri.plugin_path, nri.plugin_config_path) == ("/opt/nri/plugins", "/etc/nri/conf.d")
    assert nri.registration_timeout > 0 and nri.request_timeout > 0


def test_integer_is_accepted_for_a_float(tmp_path: Path) -> None:
    path = tmp_path / "cripy.toml"
    path.write_text("[image]\nregistry_timeout = 5\n")
    assert load(path).image.registry_timeout == 5.0


# --- the node's files: /etc/cripy/cripy.toml and the cripy.d drop-ins -------------------


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /etc/cripy, used as the default file and drop-in directory."""
    root = tmp_path / "etc-cripy"
    (root / "cripy.d").mkdir(parents=True)
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_FILE", str(root / "cripy.toml"))
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_DIR", str(root / "cripy.d"))
    return root


def test_drop_ins_merge_in_lexical_order_tables_deeply(etc: Path) -> None:
    (etc / "cripy.toml").write_text(
        'log_level = "warning"\n[image]\npull_concurrency = 5\nregistry_timeout = 7\n'
        '[registries."a:5000"]\ninsecure = true\n')
    drop_ins = etc / "cripy.d"
    (drop_ins / "20-later.toml").write_text('[image]\npull_concurrency = 9\n')
    (drop_ins / "10-first.toml").write_text(
        '[image]\npull_concurrency = 2\n[registries."a:5000"]\nmirrors = ["m:1"]\n'
        '[network]\ncni_plugin_dirs = ["/one", "/two"]\n')
    (drop_ins / "30-lists.toml").write_text('[network]\ncni_plugin_dirs = ["/three"]\n')
    (drop_ins / "99-ignored.conf").write_text("not toml at all = = =\n")
    (drop_ins / ".50-hidden.toml").write_text("colour = 1\n")
    (drop_ins / "40-dir.toml").mkdir()
    files = node_config_files()
    assert [f.name for f in files] == ["cripy.toml", "10-first.toml", "20-later.toml",
                                       "30-lists.toml"]
    config = load_files(files)
    assert config.log_level == "warning"  # only the main file sets it
    assert config.image.pull_concurrency == 9  # the last drop-in wins
    assert config.image.registry_timeout == 7.0  # a sibling key survives the table merge
    assert config.registries["a:5000"].insecure  # per-registry tables merge too
    assert config.registries["a:5000"].mirrors == ["m:1"]
    assert config.network.cni_plugin_dirs == ["/three"]  # lists are replaced, not joined


def test_without_files_the_defaults(etc: Path) -> None:
    assert node_config_files() == []
    (etc / "cripy.d").rmdir()
    assert node_config_files() == []
    assert load_files([]) == Config()


def test_drop_ins_apply_without_the_main_file(etc: Path) -> None:
    (etc / "cripy.d" / "10-x.toml").write_text('log_level = "debug"\n')
    assert load_files(node_config_files()).log_level == "debug"


def test_an_explicit_file_skips_the_default_drop_ins_unless_a_dir_is_given(
        etc: Path, tmp_path: Path) -> None:
    (etc / "cripy.d" / "10-x.toml").write_text('log_level = "debug"\n')
    mine = tmp_path / "mine.toml"
    mine.write_text('log_level = "error"\n')
    assert node_config_files(mine) == [mine]
    other = tmp_path / "other.d"
    other.mkdir()
    (other / "a.toml").write_text('log_level = "warning"\n')
    assert load_files(node_config_files(mine, other)).log_level == "warning"
    assert load_files(node_config_files(None, other)).log_level == "warning"
    with pytest.raises(ConfigError, match=f"cannot read config directory {tmp_path}/nope"):
        node_config_files(mine, tmp_path / "nope")


@pytest.mark.parametrize(("drop_in", "message"), [
    ("[image]\npull_concurency = 2\n", "10-bad.toml: unknown config key image.pull_concurency"),
    ("root = 5\n", "10-bad.toml: root: expected a string, got an integer"),
    ("root = \n", "10-bad.toml: Invalid value"),
    ('log_level = "loud"\n', "10-bad.toml: log_level: must be one of"),
    ("[streaming]\nport = 70000\n", "10-bad.toml: streaming.port: 70000 is not a port"),
])
def test_a_bad_drop_in_is_named_with_the_key(etc: Path, drop_in: str, message: str) -> None:
    (etc / "cripy.toml").write_text('log_level = "info"\n[streaming]\nport = 1\n')
    (etc / "cripy.d" / "05-good.toml").write_text("[image]\npull_concurrency = 2\n")
    (etc / "cripy.d" / "10-bad.toml").write_text(drop_in)
    with pytest.raises(ConfigError, match=message) as info:
        load_files(node_config_files())
    assert str(info.value).startswith(f"config file {etc}/cripy.d/10-bad.toml: ")
    assert "\n" not in str(info.value)


def test_keys_that_go_together_may_come_from_different_files(etc: Path) -> None:
    (etc / "cripy.toml").write_text('[streaming]\ntls_cert_file = "/c.pem"\n')
    (etc / "cripy.d" / "10-key.toml").write_text('[streaming]\ntls_key_file = "/k.pem"\n')
    config = load_files(node_config_files())
    assert (config.streaming.tls_cert_file, config.streaming.tls_key_file) == ("/c.pem", "/k.pem")
