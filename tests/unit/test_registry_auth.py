from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from cripy.config import Config, RegistryHostConfig
from cripy.errors import (
    DeadlineExceededError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from cripy.image import manifest as m
from cripy.image.manifest import Descriptor, Platform
from cripy.image.pipeline import BytesSink
from cripy.image.reference import parse_reference
from cripy.image.registry import (
    Challenge,
    Credentials,
    Endpoint,
    RegistryClient,
    parse_www_authenticate,
    registry_endpoints,
)

T = TypeVar("T")

# --- WWW-Authenticate ----------------------------------------------------------------

CHALLENGES: list[tuple[str | list[str], list[Challenge]]] = [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/busybox:pull"',
     [Challenge("bearer", {"realm": "https://auth.docker.io/token",
                           "service": "registry.docker.io",
                           "scope": "repository:library/busybox:pull"})]),
    ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
    # commas inside a quoted value
    ('Bearer realm="https://r.example/token",scope="repository:a/b:pull,push",service="s"',
     [Challenge("bearer", {"realm": "https://r.example/token",
                           "scope": "repository:a/b:pull,push", "service": "s"})]),
    # two challenges in one value
    ('Basic realm="x", Bearer realm="https://y/token",service="z"',
     [Challenge("basic", {"realm": "x"}),
      Challenge("bearer", {"realm": "https://y/token", "service": "z"})]),
    # escapes, case, blanks around "="
    (r'BEARER Realm = "a\"b\\c" ,  SERVICE= "svc"',
     [Challenge("bearer", {"realm": 'a"b\\c', "service": "svc"})]),
    # unquoted values, including an unquoted URL
    ("Bearer realm=https://auth.example/token, service=svc",
     [Challenge("bearer", {"realm": "https://auth.example/token", "service": "svc"})]),
    # several header lines
    (['Basic realm="a"', 'Bearer realm="b"'],
     [Challenge("basic", {"realm": "a"}), Challenge("bearer", {"realm": "b"})]),
    ("Bearer", [Challenge("bearer", {})]),
    ('Bearer realm="unterminated', [Challenge("bearer", {"realm": "unterminated"})]),
    ("", []),
    (' , ,, "', []),
    ('realm="orphan"', []),
]


@pytest.mark.parametrize(("header", "expected"), CHALLENGES)
def test_parse_www_authenticate(header: str | list[str], expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


# --- endpoints -----------------------------------------------------------------------


def config_with(registries: dict[str, RegistryHostConfig] | None = None,
                timeout: float = 5.0) -> Config:
    config = Config()
    config.registries = registries or {}
    config.image.registry_timeout = timeout
    return config


def urls(domain: str, config: Config) -> list[tuple[str, str, bool]]:
    return [(e.url, e.host, e.mirror) for e in registry_endpoints(domain, config)]


def test_endpoints_default() -> None:
    config = config_with()
    assert urls("docker.io", config) == [
        ("https://registry-1.docker.io", "registry-1.docker.io", False)]
    assert urls("quay.io", config) == [("https://quay.io", "quay.io", False)]
    assert urls("localhost:5000", config) == [
        ("https://localhost:5000", "localhost:5000", False)]


def test_endpoints_mirrors_in_order() -> None:
    config = config_with({"docker.io": RegistryHostConfig(mirrors=[
        "mirror.local:5000", "http://10.0.0.1:5000", "https://m.example/v2/",
        "https://m2.example/prefix/"])})
    assert urls("docker.io", config) == [
        ("https://mirror.local:5000", "mirror.local:5000", True),
        ("http://10.0.0.1:5000", "10.0.0.1:5000", True),
        ("https://m.example", "m.example", True),
        ("https://m2.example/prefix", "m2.example", True),
        ("https://registry-1.docker.io", "registry-1.docker.io", False),
    ]


def test_endpoints_insecure_domain() -> None:
    config = config_with({"127.0.0.1:5000": RegistryHostConfig(
        mirrors=["mirror:5001", "https://secure-mirror:5002"], insecure=True)})
    assert urls("127.0.0.1:5000", config) == [
        ("http://mirror:5001", "mirror:5001", True),
        ("https://secure-mirror:5002", "secure-mirror:5002", True),
        ("http://127.0.0.1:5000", "127.0.0.1:5000", False),
    ]


def test_endpoints_insecure_mirror_host() -> None:
    config = config_with({
        "quay.io": RegistryHostConfig(mirrors=["cache.lan:5000", "other.lan"]),
        "cache.lan:5000": RegistryHostConfig(insecure=True),
    })
    assert urls("quay.io", config) == [
        ("http://cache.lan:5000", "cache.lan:5000", True),
        ("https://other.lan", "other.lan", True),
        ("https://quay.io", "quay.io", False),
    ]


def test_endpoints_skip_malformed_mirrors() -> None:
    config = config_with({"quay.io": RegistryHostConfig(
        mirrors=["", "ftp://x.example", "https://", "user:pw@host", "ok.example"])})
    assert urls("quay.io", config) == [
        ("https://ok.example", "ok.example", True),
        ("https://quay.io", "quay.io", False),
    ]


# --- credentials ---------------------------------------------------------------------


def test_credentials() -> None:
    assert Credentials().user_password() is None
    assert not Credentials().given
    assert Credentials(username="u", password="p").user_password() == ("u", "p")
    auth = base64.b64encode(b"me:se:cret").decode()
    assert Credentials(auth=auth).user_password() == ("me", "se:cret")
    with pytest.raises(InvalidArgumentError):
        Credentials(auth="!!!").user_password()
    with pytest.raises(InvalidArgumentError):
        Credentials(auth=base64.b64encode(b"nocolon").decode()).user_password()
    text = repr(Credentials(username="u", password="hunter2", identity_token="idt"))
    assert "hunter2" not in text and "idt" not in text


# --- the client against an in-memory registry ----------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYER = b"layer-bytes" * 1000
CONFIG = b'{"architecture":"amd64","os":"linux"}'
MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": m.OCI_MANIFEST,
    "config": {"mediaType": m.OCI_CONFIG, "digest": sha(CONFIG), "size": len(CONFIG)},
    "layers": [{"mediaType": m.OCI_LAYER_TAR_GZIP, "digest": sha(LAYER),
                "size": len(LAYER)}],
}).encode()
INDEX = json.dumps({
    "schemaVersion": 2, "mediaType": m.OCI_INDEX,
    "manifests": [
        {"mediaType": m.OCI_MANIFEST, "digest": sha(b"other"), "size": 5,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": m.OCI_MANIFEST, "digest": sha(MANIFEST), "size": len(MANIFEST),
         "platform": {"os": "linux", "architecture": "amd64"}},
    ],
}).encode()
AMD64 = Platform("linux", "amd64")

Handler = Callable[[httpx.Request], httpx.Response]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def client_for(handler: Handler, config: Config | None = None) -> RegistryClient:
    return RegistryClient(config or config_with(), transport=httpx.MockTransport(handler))


class FakeRegistry:
    """Serves MANIFEST/INDEX/blobs for repo x on reg.example, behind a token server."""

    def __init__(self, *, user: str = "", password: str = "", tagged: bytes = INDEX) -> None:
        self.user, self.password = user, password
        self.tagged = tagged
        self.token_requests: list[httpx.Request] = []
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = request.url
        if url.host == "auth.example":
            self.token_requests.append(request)
            if self.user:
                want = "Basic " + base64.b64encode(
                    f"{self.user}:{self.password}".encode()).decode()
                if request.headers.get("authorization") != want:
                    return httpx.Response(401, json={"details": "bad credentials"})
            assert url.params.get_list("scope") == ["repository:x:pull"]
            assert url.params.get("service") == "reg.example"
            return httpx.Response(200, json={"access_token": "TOKEN", "expires_in": 300})
        if url.host == "cdn.example":
            assert "authorization" not in request.headers
            return httpx.Response(200, content=LAYER)
        assert url.host == "reg.example"
        if request.headers.get("authorization") != "Bearer TOKEN":
            return httpx.Response(401, headers={"WWW-Authenticate": (
                'Bearer realm="https://auth.example/token",service="reg.example",'
                'scope="repository:x:pull"')})
        path = url.path
        if path == "/v2/x/manifests/latest":
            media = json.loads(self.tagged)["mediaType"]
            return httpx.Response(200, content=self.tagged,
                                  headers={"Content-Type": media,
                                           "Docker-Content-Digest": sha(self.tagged)})
        for body in (INDEX, MANIFEST):
            if path == f"/v2/x/manifests/{sha(body)}":
                return httpx.Response(200, content=body,
                                      headers={"Content-Type": json.loads(body)["mediaType"]})
        if path == f"/v2/x/blobs/{sha(LAYER)}":
            return httpx.Response(307, headers={"Location": "https://cdn.example/blob?sig=1"})
        if path == f"/v2/x/blobs/{sha(CONFIG)}":
            return httpx.Response(200, content=CONFIG)
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN",
                                                     "message": "manifest unknown"}]})


def test_resolve_index_with_bearer_and_fetch_blobs(tmp_path: Path) -> None:
    registry = FakeRegistry(user="u", password="p")
    creds = Credentials(username="u", password="p")

    async def go() -> None:
        client = client_for(registry)
        try:
            resolved = await client.resolve(parse_reference("reg.example/x"), creds, AMD64)
            assert resolved.repo_digest == sha(INDEX)
            assert resolved.manifest_digest == sha(MANIFEST)
            assert resolved.manifest_bytes == MANIFEST
            assert resolved.index_bytes == INDEX
            assert resolved.endpoint_host == "reg.example"
            seen: list[int] = []
            layer = await client.fetch_blob_bytes(resolved, resolved.manifest.layers[0],
                                                  seen.append)
            assert layer == LAYER
            assert sum(seen) == len(LAYER)
            assert await client.fetch_blob_bytes(resolved, resolved.manifest.config) == CONFIG
            # A second resolve reuses the cached token.
            await client.resolve(parse_reference("reg.example/x"), creds, AMD64)
            assert len(registry.token_requests) == 1
            # ...but another set of credentials does not get it.
            with pytest.raises(UnauthenticatedError, match="refused the credentials for x"):
                await client.resolve(parse_reference("reg.example/x"),
                                     Credentials(username="u", password="wrong"), AMD64)
            with pytest.raises(UnauthenticatedError, match="requires authentication"):
                await client.resolve(parse_reference("reg.example/x"), None, AMD64)
        finally:
            await client.aclose()

    run(go())


def test_resolve_by_digest_and_missing_platform() -> None:
    registry = FakeRegistry(tagged=MANIFEST)

    async def go() -> None:
        client = client_for(registry)
        try:
            resolved = await client.resolve(
                parse_reference(f"reg.example/x@{sha(INDEX)}"), None, AMD64)
            assert resolved.repo_digest == sha(INDEX)
            single = await client.resolve(parse_reference("reg.example/x:latest"), None)
            assert single.index_bytes is None
            assert single.repo_digest == single.manifest_digest == sha(MANIFEST)
            with pytest.raises(NotFoundError, match="linux/amd64, linux/arm64/v8"):
                await client.resolve(parse_reference(f"reg.example/x@{sha(INDEX)}"), None,
                                     Platform("linux", "s390x"))
            with pytest.raises(NotFoundError, match="not found in reg.example"):
                await client.resolve(parse_reference("reg.example/x:nope"), None)
        finally:
            await client.aclose()

    run(go())


def test_manifest_digest_mismatch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=MANIFEST, headers={"Content-Type": m.OCI_MANIFEST})

    async def go() -> None:
        client = client_for(handler)
        try:
            with pytest.raises(IntegrityError, match="expected sha256:"):
                await client.resolve(parse_reference(f"reg.example/x@{sha(b'x')}"), None)
        finally:
            await client.aclose()

    run(go())


def test_basic_auth_and_registry_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization")
        if request.url.host == "basic.example":
            if auth != "Basic " + base64.b64encode(b"u:p").decode():
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        elif auth != "Bearer RT":
            return httpx.Response(401, headers={
                "WWW-Authenticate": 'Bearer realm="https://auth.invalid/token"'})
        return httpx.Response(200, content=MANIFEST, headers={"Content-Type": m.OCI_MANIFEST})

    async def go() -> None:
        client = client_for(handler)
        try:
            auth = base64.b64encode(b"u:p").decode()
            await client.resolve(parse_reference("basic.example/x"), Credentials(auth=auth))
            with pytest.raises(UnauthenticatedError, match="requires authentication"):
                await client.resolve(parse_reference("basic.example/x"), None)
            with pytest.raises(UnauthenticatedError, match="refused the credentials"):
                await client.resolve(parse_reference("basic.example/x"),
                                     Credentials(username="u", password="bad"))
            await client.resolve(parse_reference("bearer.example/x"),
                                 Credentials(registry_token="RT"))
            with pytest.raises(UnauthenticatedError, match="refused the credentials"):
                await client.resolve(parse_reference("bearer.example/x"),
                                     Credentials(registry_token="other"))
        finally:
            await client.aclose()

    run(go())


def test_identity_token_uses_oauth_post() -> None:
    seen: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            assert request.method == "POST"
            from urllib.parse import parse_qs
            seen.append(parse_qs(request.content.decode()))
            return httpx.Response(200, json={"access_token": "AT"})
        if request.headers.get("authorization") != "Bearer AT":
            return httpx.Response(401, headers={"WWW-Authenticate":
                                                'Bearer realm="https://auth.example/t",'
                                                'service="svc"'})
        return httpx.Response(200, content=MANIFEST, headers={"Content-Type": m.OCI_MANIFEST})

    async def go() -> None:
        client = client_for(handler)
        try:
            await client.resolve(parse_reference("reg.example/a/b"),
                                 Credentials(identity_token="REFRESH"))
        finally:
            await client.aclose()

    run(go())
    assert seen == [{"grant_type": ["refresh_token"], "refresh_token": ["REFRESH"],
                     "client_id": ["cripy"], "scope": ["repository:a/b:pull"],
                     "service": ["svc"]}]


def blob_client(tmp_path: Path, blob: Handler) -> tuple[RegistryClient, Descriptor]:
    def handler(request: httpx.Request) -> httpx.Response:
        if "/manifests/" in request.url.path:
            return httpx.Response(200, content=MANIFEST,
                                  headers={"Content-Type": m.OCI_MANIFEST})
        return blob(request)

    desc = Descriptor(m.OCI_LAYER_TAR_GZIP, sha(LAYER), len(LAYER))
    return client_for(handler), desc


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1000):
        yield data[i:i + 1000]


@pytest.mark.parametrize(("blob", "error", "message"), [
    (lambda r: httpx.Response(200, content=_chunks(LAYER + b"x")), IntegrityError,
     "more than"),
    (lambda r: httpx.Response(200, content=_chunks(LAYER[:-1])), IntegrityError,
     "truncated"),
    (lambda r: httpx.Response(200, content=LAYER[:-1]), IntegrityError, "announces"),
    (lambda r: httpx.Response(200, content=_chunks(LAYER.upper())), IntegrityError,
     f"expected {sha(LAYER)}, got {sha(LAYER.upper())}"),
    (lambda r: httpx.Response(302, headers={"Location": str(r.url)}), UnavailableError,
     "redirect loop"),
    (lambda r: httpx.Response(302, headers={"Location": f"/hop{len(r.url.path)}{r.url.path}"}),
     UnavailableError, "more than 5 redirects"),
    (lambda r: httpx.Response(404), NotFoundError, "not found in reg.example"),
    (lambda r: httpx.Response(500, json={"errors": [{"code": "UNKNOWN", "message": "boom"}]}),
     UnavailableError, "status 500 .*UNKNOWN: boom"),
    (lambda r: httpx.Response(429), UnavailableError, "rate-limiting"),
], ids=["too-long", "truncated", "content-length", "digest", "loop", "hops", "404", "500",
        "429"])
def test_blob_failures_discard_the_sink(tmp_path: Path, blob: Handler,
                                        error: type[Exception], message: str) -> None:
    client, desc = blob_client(tmp_path, blob)
    sinks: list[RecordingSink] = []

    def open_sink() -> RecordingSink:
        sinks.append(RecordingSink())
        return sinks[-1]

    async def go() -> None:
        try:
            resolved = await client.resolve(parse_reference("reg.example/x"), None)
            with pytest.raises(error, match=message):
                await client.fetch_blob(resolved, desc, open_sink)
        finally:
            await client.aclose()

    run(go())
    assert [s.discarded for s in sinks] == [True]


class RecordingSink(BytesSink):
    discarded = False

    async def discard(self) -> None:
        self.discarded = True
        await super().discard()


@pytest.mark.parametrize(("exc", "error", "message"), [
    (httpx.ConnectError("[Errno 111] Connection refused"), UnavailableError,
     "registry reg.example unreachable: .*refused"),
    (httpx.ConnectTimeout("timed out"), UnavailableError, "unreachable: connection timed out"),
    (httpx.ReadTimeout("timed out"), DeadlineExceededError, "reg.example timed out"),
    (httpx.RemoteProtocolError("peer closed"), UnavailableError, "RemoteProtocolError"),
])
def test_transport_errors_are_mapped(exc: Exception, error: type[Exception],
                                     message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async def go() -> None:
        client = client_for(handler)
        try:
            with pytest.raises(error, match=message):
                await client.resolve(parse_reference("reg.example/x"), None)
        finally:
            await client.aclose()

    run(go())


def test_mirror_fallback() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "down.example":
            raise httpx.ConnectError("refused")
        if request.url.host == "empty.example":
            return httpx.Response(404)
        if request.url.host == "broken.example":
            return httpx.Response(503)
        if request.url.host == "registry-1.docker.io":
            return httpx.Response(404)
        raise AssertionError(request.url)

    config = config_with({"docker.io": RegistryHostConfig(
        mirrors=["down.example", "empty.example", "broken.example"])})

    async def go() -> None:
        client = client_for(handler, config)
        try:
            with pytest.raises(NotFoundError,
                               match="docker.io/library/busybox:latest not found in "
                                     "registry-1.docker.io"):
                await client.resolve(parse_reference("busybox"), None)
        finally:
            await client.aclose()

    run(go())
    assert hosts == ["down.example", "empty.example", "broken.example", "registry-1.docker.io"]


def test_endpoint_is_hashable() -> None:
    assert len({Endpoint("https://a", "a", False), Endpoint("https://a", "a", False)}) == 1
