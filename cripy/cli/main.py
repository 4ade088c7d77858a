"""`cripy`: the daemon, the configuration printer, and the CRI client (`cripy ctl`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from cripy import __version__
from cripy.config import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_CONFIG_FILE,
    Config,
    ConfigError,
    load_files,
    node_config_files,
    render,
    render_default,
    validate,
)
from cripy.errors import CripyError


def _daemon_config(args: argparse.Namespace) -> Config:
    config = load_files(node_config_files(args.config, args.config_dir))
    for flag in ("root", "runroot", "listen", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            setattr(config, flag, value)
    return validate(config)


def run_daemon(args: argparse.Namespace) -> int:
    from cripy.daemon import serve
    from cripy.logs import setup_logging

    config = _daemon_config(args)
    setup_logging(config.log_level, config.monitoring.log_format)
    asyncio.run(serve(config, lambda: _daemon_config(args)))
    return 0


def print_config(args: argparse.Namespace) -> int:
    if args.defaults:
        sys.stdout.write(render_default())
        return 0
    files = node_config_files(args.config, args.config_dir)
    text = render(load_files(files))
    merged = ", ".join(str(f) for f in files) or "none (the defaults)"
    sys.stdout.write(f"# Merged from: {merged}\n{text}")
    return 0


def install_service(args: argparse.Namespace) -> int:
    from cripy.service import install

    for line in install(unit_dir=args.unit_dir, config_dir=args.config_dir, cripy=args.cripy,
                        enable=args.enable):
        print(line)
    return 0


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE",
        help=f"TOML configuration file (default {DEFAULT_CONFIG_FILE} if it exists; "
             "a FILE given here is read without the default drop-ins)")
    parser.add_argument(
        "--config-dir", dest="config_dir", metavar="DIR",
        help=f"drop-in directory: its *.toml files are merged over the file in lexical "
             f"order (default {DEFAULT_CONFIG_DIR} when --config is not given)")


def build_parser(clients: bool = True) -> argparse.ArgumentParser:
    """`clients`: also the `ctl` and `status` commands (the daemon does without them:
    their modules cost a third of its import time)."""
    parser = argparse.ArgumentParser(prog="cripy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cripy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = commands.add_parser("daemon", help="serve the CRI on a unix socket")
    _config_flags(daemon)
    daemon.add_argument("--root", metavar="DIR", help="persistent state (default /var/lib/cripy)")
    daemon.add_argument("--runroot", metavar="DIR", help="volatile state (default /run/cripy)")
    daemon.add_argument("--listen", metavar="ENDPOINT",
                        help="CRI endpoint (default unix:///run/cripy/cripy.sock)")
    daemon.add_argument("--log-level", dest="log_level",
                        choices=["debug", "info", "warning", "error"])
    daemon.set_defaults(func=run_daemon)

    config = commands.add_parser(
        "config", help="print the configuration the daemon would use, as commented TOML")
    _config_flags(config)
    config.add_argument("--defaults", action="store_true",
                        help="print the built-in defaults, ignoring every file")
    config.set_defaults(func=print_config)

    service = commands.add_parser(
        "install-service",
        help="install the systemd unit cripy.service running this cripy (reloads systemd "
             "where it runs)")
    service.add_argument("--unit-dir", dest="unit_dir", metavar="DIR",
                         default="/etc/systemd/system", help="where the unit goes")
    service.add_argument("--config-dir", dest="config_dir", metavar="DIR",
                         default=DEFAULT_CONFIG_DIR, help="the drop-in directory to create")
    service.add_argument("--cripy", metavar="PATH",
                         help="the cripy executable ExecStart runs (default: this one)")
    service.add_argument("--enable", action="store_true",
                         help="also systemctl enable --now cripy.service")
    service.set_defaults(func=install_service)

    if clients:
        from cripy.cli import ctl, status

        ctl.add_parser(commands)
        status.add_parser(commands)
    return parser


def _command(argv: list[str]) -> str:
    """The command word: the first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(clients=_command(argv) != "daemon").parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"cripy: config: {exc}", file=sys.stderr)
        return 2
    except CripyError as exc:
        print(f"cripy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
