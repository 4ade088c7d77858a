from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cripy.config import Config, ConfigError, load, render, render_default


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
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cripy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_integer_is_accepted_for_a_float(tmp_path: Path) -> None:
    path = tmp_path / "cripy.toml"
    path.write_text("[image]\nregistry_timeout = 5\n")
    assert load(path).image.registry_timeout == 5.0
