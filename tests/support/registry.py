"""A real OCI registry (Debian ``docker-registry``, distribution 2.8) for tests.

``Registry`` starts ``docker-registry serve`` on 127.0.0.1 with filesystem storage in a
private temp dir, plain HTTP and deletes enabled, and stops it (and removes the dir) on
exit. Three auth modes:

* anonymous (default);
* ``htpasswd=(user, password)``: HTTP basic auth against a bcrypt htpasswd file;
* ``token=(user, password)``: distribution's bearer token auth, with a small token server
  in a thread of this process that checks basic credentials and issues RS256 JWTs.

Token verification in distribution 2.8 (``registry/auth/token``) takes the signing key
from, in order, the JWT header's ``x5c`` chain (verified against ``rootcertbundle``), a
``jwk`` header, or ``kid`` looked up among the bundle's keys (libtrust fingerprints). We
put the self-signed certificate itself in ``x5c``; it is also the whole root bundle, so
the chain is just the root.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "/usr/bin/htpasswd"

TOKEN_SERVICE = "cripy-test-registry"
TOKEN_ISSUER = "cripy-test-token-issuer"
BASIC_REALM = "cripy-test-registry"

__all__ = [
    "BASIC_REALM",
    "Registry",
    "RegistryStartError",
    "TOKEN_ISSUER",
    "TOKEN_SERVICE",
    "TokenServer",
    "free_port",
    "parse_scope",
    "unreachable_host",
]


class RegistryStartError(RuntimeError):
    """The registry (or its token server) did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unreachable_host() -> str:
    """``127.0.0.1:PORT`` of a port nothing listens on (connections are refused)."""
    return f"127.0.0.1:{free_port()}"


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split a token ``scope`` item ``type:name:actions`` (name may contain ``:``)."""
    kind, sep, rest = scope.partition(":")
    if not sep:
        return None
    name, sep, actions = rest.rpartition(":")
    if not sep or not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _SigningKey:
    """An RSA key and its self-signed certificate (the registry's whole root bundle)."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TOKEN_ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self._key = key
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        self.cert_der_b64: str = base64.b64encode(
            cert.public_bytes(serialization.Encoding.DER)
        ).decode("ascii")

    def sign_rs256(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def jwt(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        return signing_input + "." + _b64url(self.sign_rs256(signing_input.encode("ascii")))


class TokenServer:
    """A distribution-style token endpoint (``GET /token``) in a background thread.

    Valid basic credentials get every action they ask for in ``scope``; no credentials
    get a token with an empty access list (so the registry answers 401/403); wrong
    credentials get 401.
    """

    def __init__(
        self,
        credentials: tuple[str, str],
        *,
        service: str = TOKEN_SERVICE,
        issuer: str = TOKEN_ISSUER,
        ttl_seconds: int = 300,
    ) -> None:
        self.credentials = credentials
        self.service = service
        self.issuer = issuer
        self.ttl_seconds = ttl_seconds
        self.key = _SigningKey()
        self._lock = threading.Lock()
        self._requests = 0
        self._rejected = 0
        self.issued: list[dict[str, Any]] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = True
        self._server = server
        self.port: int = server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> int:
        """Requests answered so far (including refused ones)."""
        with self._lock:
            return self._requests

    @property
    def rejected(self) -> int:
        """Requests refused with 401 (wrong credentials)."""
        with self._lock:
            return self._rejected

    def start(self) -> None:
        thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"token-server-{self.port}",
            daemon=True,
        )
        thread.start()
        self._thread = thread

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    # -- token issuing -------------------------------------------------------------

    def _check_basic(self, header: str | None) -> str | None | bool:
        """The user name for good credentials, None for none, False for bad ones."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if (user, password) == self.credentials:
            return user
        return False

    def issue(self, subject: str, scopes: list[str], *, grant: bool) -> dict[str, Any]:
        now = int(time.time())
        access: list[dict[str, Any]] = []
        if grant:
            for scope in scopes:
                for item in scope.split(" "):
                    parsed = parse_scope(item)
                    if parsed is not None:
                        kind, name, actions = parsed
                        access.append({"type": kind, "name": name, "actions": actions})
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.ttl_seconds,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = self.key.jwt(claims)
        with self._lock:
            self.issued.append(claims)
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.ttl_seconds,
            "issued_at": datetime.datetime.fromtimestamp(now, datetime.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", f'Basic realm="{server.issuer}"')
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, params: dict[str, list[str]], user: str | None | bool) -> None:
                with server._lock:
                    server._requests += 1
                if user is False:
                    with server._lock:
                        server._rejected += 1
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                    return
                service = params.get("service", [server.service])[0]
                if service != server.service:
                    self._reply(400, {"errors": [{"code": "INVALID_SERVICE"}]})
                    return
                scopes = params.get("scope", [])
                subject = user if isinstance(user, str) else ""
                self._reply(200, server.issue(subject, scopes, grant=isinstance(user, str)))

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/token":
                    self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                params = urllib.parse.parse_qs(url.query)
                self._handle(params, server._check_basic(self.headers.get("Authorization")))

            def do_POST(self) -> None:  # noqa: N802
                # OAuth2 password grant (docker's "offline token" flow).
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if url.path != "/token":
                    self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                user: str | None | bool = server._check_basic(self.headers.get("Authorization"))
                if user is None and form.get("grant_type") == ["password"]:
                    pair = (form.get("username", [""])[0], form.get("password", [""])[0])
                    user = pair[0] if pair == server.credentials else False
                self._handle(form, user)

        return Handler


class Registry:
    """``docker-registry`` on 127.0.0.1; use as a context manager.

    ``host`` is ``127.0.0.1:PORT``, ``url`` is ``http://127.0.0.1:PORT``.
    """

    def __init__(
        self,
        *,
        htpasswd: tuple[str, str] | None = None,
        token: tuple[str, str] | None = None,
        token_ttl_seconds: int = 300,
        start_timeout: float = 20.0,
        base_dir: str | Path | None = None,
        port: int = 0,
    ) -> None:
        """`port` 0 picks a free one."""
        if htpasswd is not None and token is not None:
            raise ValueError("choose one of htpasswd= and token=")
        self.credentials: tuple[str, str] | None = htpasswd or token
        self.auth_mode: str = "htpasswd" if htpasswd else "token" if token else "anonymous"
        self._token_ttl = token_ttl_seconds
        self._start_timeout = start_timeout
        self._base_dir = str(base_dir) if base_dir is not None else None
        self._want_port = port
        self.port = 0
        self.host = ""
        self.url = ""
        self.dir: Path | None = None
        self.token_server: TokenServer | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- public helpers ------------------------------------------------------------

    @property
    def token_requests(self) -> int:
        """How many times the token server was asked for a token (0 without one)."""
        return self.token_server.requests if self.token_server is not None else 0

    @property
    def realm(self) -> str | None:
        """The token realm URL (token mode) or None."""
        return self.token_server.realm if self.token_server is not None else None

    @property
    def service(self) -> str | None:
        return TOKEN_SERVICE if self.token_server is not None else None

    @property
    def log_path(self) -> Path:
        if self.dir is None:
            raise RuntimeError("registry not started")
        return self.dir / "registry.log"

    def ref(self, repo: str, tag: str = "latest") -> str:
        """``127.0.0.1:PORT/repo:tag``."""
        return f"{self.host}/{repo}:{tag}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Registry:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self.dir is not None:
            raise RuntimeError("registry already started")
        self.dir = Path(tempfile.mkdtemp(prefix="cripy-registry-", dir=self._base_dir))
        (self.dir / "storage").mkdir()
        auth: dict[str, Any] | None = None
        if self.auth_mode == "htpasswd":
            assert self.credentials is not None
            auth = {"htpasswd": {"realm": BASIC_REALM, "path": str(self._write_htpasswd())}}
        elif self.auth_mode == "token":
            assert self.credentials is not None
            self.token_server = TokenServer(self.credentials, ttl_seconds=self._token_ttl)
            bundle = self.dir / "token-root.pem"
            bundle.write_bytes(self.token_server.key.cert_pem)
            auth = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": TOKEN_SERVICE,
                    "issuer": TOKEN_ISSUER,
                    "rootcertbundle": str(bundle),
                }
            }
            self.token_server.start()
        last_error = ""
        for _attempt in range(3):
            self.port = self._want_port or free_port()
            self.host = f"127.0.0.1:{self.port}"
            self.url = f"http://{self.host}"
            config = self.dir / "config.yml"
            config.write_text(json.dumps(self._config(auth), indent=2))  # JSON is YAML
            error = self._spawn_and_wait(config)
            if error is None:
                return
            last_error = error
            self._kill_process()
            if "address already in use" not in self.log_tail(200):
                break
        raise RegistryStartError(
            f"docker-registry did not start on {self.host}: {last_error}\n"
            f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the registry and token server and delete the temp dir. Idempotent."""
        try:
            self._kill_process()
        finally:
            try:
                if self.token_server is not None:
                    self.token_server.stop()
            finally:
                if self.dir is not None:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    self.dir = None

    # -- internals -----------------------------------------------------------------

    def _write_htpasswd(self) -> Path:
        assert self.dir is not None and self.credentials is not None
        user, password = self.credentials
        result = subprocess.run(
            [HTPASSWD_BINARY, "-Bbn", user, password],
            check=True,
            capture_output=True,
        )
        path = self.dir / "htpasswd"
        path.write_bytes(result.stdout.strip() + b"\n")
        return path

    def _config(self, auth: dict[str, Any] | None) -> dict[str, Any]:
        assert self.dir is not None
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "formatter": "text",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.dir / "storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if auth is not None:
            config["auth"] = auth
        return config

    def _spawn_and_wait(self, config: Path) -> str | None:
        """Start the process; None once /v2/ answers, else an error description."""
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _kill_process
        self._proc = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        deadline = time.monotonic() + self._start_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                code = self._proc.poll()
                if code is not None:
                    return f"exited with status {code}"
                try:
                    response = client.get(f"{self.url}/v2/")
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if response.status_code in (200, 401):
                    return None
                return f"GET /v2/ answered {response.status_code}"
        return f"/v2/ did not answer within {self._start_timeout}s"

    def _kill_process(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        finally:
            if self._log_file is not None:
                with contextlib.suppress(OSError):
                    self._log_file.close()
                self._log_file = None
