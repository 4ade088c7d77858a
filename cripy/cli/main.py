"""`cripy`: the daemon, the configuration printer, and the CRI client (`cripy ctl`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from cripy import __version__
from cripy.cli import ctl, status
from cripy.config import Config, ConfigError, load, render, validate
from cripy.errors import CripyError


def _daemon_config(args: argparse.Namespace) -> Config:
    config = load(args.config)
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
    sys.stdout.write(render(load(args.config)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cripy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cripy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = commands.add_parser("daemon", help="serve the CRI on a unix socket")
    daemon.add_argument("--config", metavar="FILE", help="TOML configuration file")
    daemon.add_argument("--root", metavar="DIR", help="persistent state (default /var/lib/cripy)")
    daemon.add_argument("--runroot", metavar="DIR", help="volatile state (default /run/cripy)")
    daemon.add_argument("--listen", metavar="ENDPOINT",
                        help="CRI endpoint (default unix:///run/cripy/cripy.sock)")
    daemon.add_argument("--log-level", dest="log_level",
                        choices=["debug", "info", "warning", "error"])
    daemon.set_defaults(func=run_daemon)

    config = commands.add_parser(
        "config", help="print the configuration as commented TOML (the defaults, or FILE merged)"
    )
    config.add_argument("--config", metavar="FILE", help="TOML file to merge over the defaults")
    config.set_defaults(func=print_config)

    ctl.add_parser(commands)
    status.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
