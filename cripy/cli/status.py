"""`cripy status`: ask the daemon's status API (like `crio status`).

    cripy status [--socket PATH | --config FILE] info | config | containers ID
                                                 | pause ID | unpause ID

JSON is printed indented (the configuration as TOML); errors are one line on stderr,
e.g. `cripy status containers: 404: container 'x' not found`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

import httpx

from cripy.config import MonitoringConfig, load

DEFAULT_SOCKET = MonitoringConfig().status_socket


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("status", help="query the daemon's status API",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help=f"the status API socket (default {DEFAULT_SOCKET})")
    where.add_argument("--config", metavar="FILE",
                       help="take the socket from this daemon config (monitoring.status_socket)")
    parser.add_argument("-t", "--timeout", type=float, default=30.0,
                        help="seconds to wait for the answer")
    what = parser.add_subparsers(dest="what", required=True, metavar="COMMAND")
    what.add_parser("info", help="the daemon: storage, cgroup driver, version")
    what.add_parser("config", help="the daemon's effective configuration (TOML)")
    for name, text in (("containers", "one container or pod"),
                       ("pause", "freeze a container"), ("unpause", "thaw a container")):
        sub = what.add_parser(name, help=text, aliases=["container"] if name == "containers"
                              else [])
        sub.add_argument("id", nargs="?", metavar="ID", help="ID or unique prefix")
        sub.add_argument("--id", dest="id_flag", metavar="ID", help="the same, as a flag")
        sub.set_defaults(what=name)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    what: str = args.what
    ident = getattr(args, "id", None) or getattr(args, "id_flag", None)
    if what in ("containers", "pause", "unpause") and not ident:
        return _fail(what, "a container ID is needed")
    method, path = {
        "info": ("GET", "/info"),
        "config": ("GET", "/config"),
        "containers": ("GET", f"/containers/{quote(ident or '', safe='')}"),
        "pause": ("POST", f"/pause/{quote(ident or '', safe='')}"),
        "unpause": ("POST", f"/unpause/{quote(ident or '', safe='')}"),
    }[what]
    socket_path = args.socket or (load(args.config).monitoring.status_socket if args.config
                                  else DEFAULT_SOCKET)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                          timeout=args.timeout) as client:
            response = client.request(method, f"http://cripy{path}")
    except httpx.HTTPError as exc:
        return _fail(what, f"cannot reach the status API at {socket_path}: {exc}")
    if response.status_code != 200:
        return _fail(what, f"{response.status_code}: {_error_text(response)}")
    if what == "config":
        sys.stdout.write(response.text)
        return 0
    try:
        value = response.json()
    except ValueError:
        return _fail(what, "the answer is not JSON")
    print(json.dumps(value, indent=2))
    return 0


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    if isinstance(message, str):
        return message
    return response.text.strip().splitlines()[0] if response.text.strip() \
        else response.reason_phrase


def _fail(what: str, message: str) -> int:
    print(f"cripy status {what}: {message}", file=sys.stderr)
    return 1
