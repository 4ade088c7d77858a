"""Async client for OCI distribution / Docker registry v2: resolve references, fetch blobs.

Auth follows the Docker token protocol: try anonymously, and on a 401 answer the
`WWW-Authenticate` challenge with Basic credentials or a Bearer token from the realm.
Everything a registry sends is untrusted: bodies are bounded, digests and sizes
verified, and every httpx failure is turned into a CripyError naming the host.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import importlib
import json
import logging
import os
import ssl
import string
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

from cripy.config import Config
from cripy.errors import (
    CripyError,
    DeadlineExceededError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from cripy.image.manifest import (
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    MANIFEST_TYPES,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    check_digest,
    host_platform,
    parse_manifest,
    select_platform,
)
from cripy.image.pipeline import BytesSink
from cripy.image.reference import Reference, is_digest

if TYPE_CHECKING:
    # Loaded at the first request, in a thread (RegistryClient._client): a node that is
    # not pulling does not hold it. Functions that use it at run time import it locally.
    import httpx

log = logging.getLogger(__name__)

USER_AGENT = "cripy/0.1"
DOCKER_HUB_DOMAIN = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_TOKEN_BYTES = 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
MAX_REDIRECTS = 5
CHUNK_BYTES = 256 * 1024
TOKEN_CLIENT_ID = "cripy"
MAX_CACHED_TOKENS = 512
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


class BlobSink(Protocol):
    """Where a blob's bytes go as they arrive (see cripy.image.pipeline)."""

    async def write(self, chunk: bytes, /) -> None: ...

    async def finish(self) -> str:
        """All bytes are written: their "sha256:..." digest."""
        ...

    async def discard(self) -> None:
        """The download failed or was cancelled: drop what was written."""
        ...


S = TypeVar("S", bound=BlobSink)


# --- credentials ---------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Registry credentials as given in the CRI AuthConfig. Secrets stay out of repr."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)  # base64("user:pass")
    identity_token: str = field(default="", repr=False)  # an OAuth2 refresh token
    registry_token: str = field(default="", repr=False)  # used as the bearer token as-is

    def user_password(self) -> tuple[str, str] | None:
        """username/password, else the decoded `auth`, else None."""
        if self.username or self.password:
            return self.username, self.password
        if self.auth:
            try:
                text = base64.b64decode(self.auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise InvalidArgumentError("registry auth is not valid base64") from exc
            user, sep, password = text.partition(":")
            if not sep:
                raise InvalidArgumentError("registry auth must encode \"user:password\"")
            return user, password
        return None

    @property
    def given(self) -> bool:
        return any((self.username, self.password, self.auth, self.identity_token,
                    self.registry_token))


# --- WWW-Authenticate ----------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic", ...
    params: dict[str, str]  # parameter names lowercased


_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


def parse_www_authenticate(headers: str | list[str]) -> list[Challenge]:
    """Parse one or more WWW-Authenticate values (RFC 7235) into challenges.

    A value may hold several challenges separated by commas; a parameter value may be a
    quoted string containing commas and backslash escapes. Garbage is skipped, never
    raised on.
    """
    values = [headers] if isinstance(headers, str) else headers
    out: list[Challenge] = []
    for value in values:
        out.extend(_parse_challenges(value))
    return out


def _parse_challenges(text: str) -> list[Challenge]:
    n = len(text)
    out: list[Challenge] = []
    current: dict[str, str] | None = None

    def skip(i: int, chars: str) -> int:
        while i < n and text[i] in chars:
            i += 1
        return i

    def token(i: int) -> tuple[str, int]:
        j = i
        while j < n and text[j] in _TOKEN_CHARS:
            j += 1
        return text[i:j], j

    i = 0
    while True:
        i = skip(i, " \t,")
        if i >= n:
            break
        name, j = token(i)
        if not name:
            i += 1  # a stray character
            continue
        k = skip(j, " \t")
        if k < n and text[k] == "=":
            k = skip(k + 1, " \t")
            if k < n and text[k] == '"':
                value, i = _quoted(text, k)
            else:
                # Lenient: unquoted values up to the next comma or blank (tokens, plus
                # the URLs some servers send unquoted).
                end = k
                while end < n and text[end] not in ", \t":
                    end += 1
                value, i = text[k:end], end
            if current is not None:
                current[name.lower()] = value
            continue
        # A token not followed by "=" starts a new challenge.
        current = {}
        out.append(Challenge(scheme=name.lower(), params=current))
        i = j
    return out


def _quoted(text: str, start: int) -> tuple[str, int]:
    """The quoted-string at text[start] == '"' -> (value, index after closing quote)."""
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(chars), i + 1
        chars.append(c)
        i += 1
    return "".join(chars), i  # unterminated: take the rest


# --- endpoints -----------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    url: str  # base URL, no trailing slash: "https://registry-1.docker.io"
    host: str  # host[:port], used in messages
    mirror: bool


def registry_endpoints(domain: str, config: Config) -> list[Endpoint]:
    """The endpoints to try for `domain`: its mirrors in order, then the registry."""
    domain_insecure = config.is_insecure(domain)
    out: list[Endpoint] = []
    host_config = config.registries.get(domain)
    for mirror in host_config.mirrors if host_config is not None else []:
        endpoint = _mirror_endpoint(mirror, domain_insecure, config)
        if endpoint is None:
            log.warning("ignoring malformed mirror %r for registry %s", mirror, domain)
        else:
            out.append(endpoint)
    host = DOCKER_HUB_ENDPOINT if domain == DOCKER_HUB_DOMAIN else domain
    scheme = "http" if domain_insecure else "https"
    out.append(Endpoint(url=f"{scheme}://{host}", host=host, mirror=False))
    return out


def _mirror_endpoint(mirror: str, domain_insecure: bool, config: Config) -> Endpoint | None:
    text = mirror.strip()
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        netloc, path = parts.netloc, parts.path
        if scheme not in ("http", "https") or parts.query or parts.fragment:
            return None
    else:
        netloc, slash, rest = text.partition("/")
        path = slash + rest
        scheme = "http" if domain_insecure or config.is_insecure(netloc) else "https"
    if not netloc or "@" in netloc or any(c.isspace() for c in netloc):
        return None
    # Accept "host/v2" and "host/prefix/" spellings; requests add "/v2/..." themselves.
    path = path.rstrip("/")
    if path.endswith("/v2"):
        path = path[: -len("/v2")]
    return Endpoint(url=f"{scheme}://{netloc}{path}", host=netloc, mirror=True)


# --- resolved images -----------------------------------------------------------------


@dataclass
class Resolved:
    reference: Reference
    repo_digest: str  # digest of what the reference named (index or manifest)
    manifest_digest: str  # digest of the platform image manifest used
    manifest: ImageManifest
    manifest_bytes: bytes
    index_bytes: bytes | None
    # Where the manifest came from; blobs are fetched from the same place.
    _session: _Session | None = field(default=None, repr=False, compare=False)

    @property
    def endpoint_host(self) -> str | None:
        return None if self._session is None else self._session.endpoint.host


@dataclass
class _Token:
    authorization: str
    expires: float  # time.monotonic()


# (realm, service, scopes, credentials): credentials are part of the key so one caller's
# token is never handed to a request made with other (or no) credentials.
_TokenKey = tuple[str, str, tuple[str, ...], Credentials | None]


class _Session:
    """One endpoint, one repository, one set of credentials; remembers the auth header."""

    def __init__(self, client: RegistryClient, endpoint: Endpoint, path: str,
                 creds: Credentials | None) -> None:
        self.client = client
        self.endpoint = endpoint
        self.path = path
        self.creds = creds if creds is not None and creds.given else None
        self.authorization: str | None = None

    @asynccontextmanager
    async def get(self, url_path: str, headers: Mapping[str, str]) -> AsyncIterator[
            httpx.Response]:
        """GET endpoint + url_path, answering auth challenges; the response streams."""
        url = self.endpoint.url + url_path
        resp = await self.client._send(url, headers, self.authorization, self.endpoint.host)
        try:
            # Two rounds: a cached token may have expired early on the server side; the
            # second round fetches a fresh one. _authorize raises once it has nothing new.
            for _ in range(2):
                if resp.status_code != 401:
                    break
                challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
                await resp.aclose()
                stale = self.authorization
                self.authorization = await self.client._authorize(self, challenges, stale)
                resp = await self.client._send(url, headers, self.authorization,
                                               self.endpoint.host)
            if resp.status_code in (401, 403):
                raise self.refused()
            yield resp
        finally:
            await resp.aclose()

    def refused(self) -> UnauthenticatedError:
        if self.creds is None:
            return UnauthenticatedError(
                f"registry {self.endpoint.host} requires authentication for {self.path} "
                "(or the repository does not exist)")
        return UnauthenticatedError(
            f"registry {self.endpoint.host} refused the credentials for {self.path}")


# --- the client ----------------------------------------------------------------------


class RegistryClient:
    def __init__(self, config: Config, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`transport` replaces the network (tests pass an httpx.MockTransport)."""
        self._config = config
        self._timeout = config.image.registry_timeout
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._tokens: dict[_TokenKey, _Token] = {}

    async def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            module = await asyncio.to_thread(importlib.import_module, "httpx")
            if self._http is None:  # another request may have made it meanwhile
                self._http = module.AsyncClient(
                    timeout=module.Timeout(self._timeout),
                    follow_redirects=False,  # followed by hand, to control auth and loops
                    headers={"User-Agent": USER_AGENT},
                    transport=self._transport,
                )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    # -- resolve --

    async def resolve(self, ref: Reference, creds: Credentials | None,
                      platform: Platform | None = None) -> Resolved:
        """Fetch the manifest `ref` names (and the platform's manifest from an index).

        Mirrors are tried first; any failure there moves on to the next endpoint, so
        the registry's own answer is what the caller finally sees.
        """
        endpoints = registry_endpoints(ref.domain, self._config)
        for endpoint in endpoints[:-1]:
            try:
                return await self._resolve_at(endpoint, ref, creds, platform)
            except CripyError as exc:
                log.warning("mirror %s failed for %s, trying the next endpoint: %s",
                            endpoint.host, ref, exc)
        return await self._resolve_at(endpoints[-1], ref, creds, platform)

    async def _resolve_at(self, endpoint: Endpoint, ref: Reference, creds: Credentials | None,
                          platform: Platform | None) -> Resolved:
        session = _Session(self, endpoint, ref.path, creds)
        # A digest pins the content; a tag next to it is informational only.
        top = ref.digest or ref.tag or "latest"
        body, content_type = await self._get_manifest(session, ref, top, expected_size=None)
        top_digest = _sha256(body)
        parsed = parse_manifest(body, content_type)
        if isinstance(parsed, ImageManifest):
            return Resolved(reference=ref, repo_digest=top_digest, manifest_digest=top_digest,
                            manifest=parsed, manifest_bytes=body, index_bytes=None,
                            _session=session)
        assert isinstance(parsed, ImageIndex)
        desc = select_platform(parsed, platform or host_platform())
        child, child_type = await self._get_manifest(session, ref, desc.digest,
                                                     expected_size=desc.size)
        # The descriptor's type is the better hint when the server's is generic.
        if child_type.split(";", 1)[0].strip().lower() not in MANIFEST_TYPES | INDEX_TYPES:
            child_type = desc.media_type
        manifest = parse_manifest(child, child_type)
        if not isinstance(manifest, ImageManifest):
            raise InvalidArgumentError(
                f"image {ref}: manifest {desc.digest} is itself an index; nested indexes "
                "are not supported")
        return Resolved(reference=ref, repo_digest=top_digest, manifest_digest=desc.digest,
                        manifest=manifest, manifest_bytes=child, index_bytes=body,
                        _session=session)

    async def _get_manifest(self, session: _Session, ref: Reference, target: str,
                            expected_size: int | None) -> tuple[bytes, str]:
        """GET a manifest by tag or digest -> (verified body, Content-Type)."""
        host = session.endpoint.host
        by_digest = is_digest(target)
        what = f"image {ref}" if target in (ref.tag, ref.digest) else \
            f"image {ref} (manifest {target})"
        if expected_size is not None and expected_size > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{what}: manifest size {expected_size} exceeds the "
                                 f"{MAX_MANIFEST_BYTES}-byte limit")
        headers = {"Accept": ", ".join(MANIFEST_ACCEPT), "Accept-Encoding": "identity"}
        async with session.get(f"/v2/{session.path}/manifests/{target}", headers) as resp:
            if resp.status_code == 404:
                raise NotFoundError(f"{what} not found in {host}")
            if resp.status_code != 200:
                raise await self._status_error(resp, host, f"manifest of {what}")
            body = await self._read_bounded(resp, MAX_MANIFEST_BYTES, host, f"manifest of {what}")
            content_type = resp.headers.get("content-type", "")
            claimed = resp.headers.get("docker-content-digest", "").strip()
        actual = _sha256(body)
        if by_digest and actual != target:
            raise IntegrityError(f"{what}: registry {host} sent a manifest with digest "
                                 f"{actual}, expected {target}")
        if is_digest(claimed) and claimed != actual:
            raise IntegrityError(f"{what}: registry {host} claims digest {claimed} but the "
                                 f"manifest it sent has digest {actual}")
        if expected_size is not None and len(body) != expected_size:
            raise IntegrityError(f"{what}: manifest is {len(body)} bytes, the index says "
                                 f"{expected_size}")
        return body, content_type

    # -- blobs --

    async def fetch_blob(self, resolved: Resolved, desc: Descriptor,
                         open_sink: Callable[[], S],
                         progress: Callable[[int], None] | None = None) -> S:
        """Download blob `desc` of `resolved` into a sink from `open_sink()`, verified.

        Returns the sink once its bytes are complete and match the digest. `progress(n)`
        is called with the size of every chunk. A sink whose download fails is
        discarded. If the manifest came from a mirror and the mirror fails, the later
        endpoints (ending with the registry) are tried, each with a new sink.
        """
        session = resolved._session
        if session is None:
            raise ValueError("Resolved was not produced by RegistryClient.resolve")
        check_digest(desc.digest, f"blob of image {resolved.reference}")
        ref = resolved.reference
        if not session.endpoint.mirror:
            return await self._fetch_blob_at(session, ref, desc, open_sink, progress)
        endpoints = registry_endpoints(resolved.reference.domain, self._config)
        later = endpoints[endpoints.index(session.endpoint) + 1:] \
            if session.endpoint in endpoints else endpoints[-1:]
        try:
            return await self._fetch_blob_at(session, ref, desc, open_sink, progress)
        except CripyError as exc:
            if not later:
                raise
            log.warning("mirror %s failed for blob %s of %s, trying the next endpoint: %s",
                        session.endpoint.host, desc.digest, resolved.reference, exc)
        for endpoint in later:
            fallback = _Session(self, endpoint, session.path, session.creds)
            try:
                return await self._fetch_blob_at(fallback, ref, desc, open_sink, progress)
            except CripyError as exc:
                if not endpoint.mirror:
                    raise
                log.warning("mirror %s failed for blob %s of %s: %s", endpoint.host,
                            desc.digest, resolved.reference, exc)
        raise AssertionError("the registry itself is always the last endpoint")

    async def fetch_blob_bytes(self, resolved: Resolved, desc: Descriptor,
                               progress: Callable[[int], None] | None = None) -> bytes:
        """A small blob (an image config) as verified bytes."""
        return (await self.fetch_blob(resolved, desc, BytesSink, progress)).data

    async def _fetch_blob_at(self, session: _Session, ref: Reference, desc: Descriptor,
                             open_sink: Callable[[], S],
                             progress: Callable[[int], None] | None) -> S:
        host = session.endpoint.host
        what = f"blob {desc.digest} of image {ref}"
        received = 0
        sink = open_sink()
        try:
            headers = {"Accept-Encoding": "identity"}
            async with session.get(f"/v2/{session.path}/blobs/{desc.digest}",
                                   headers) as resp:
                if resp.status_code == 404:
                    raise NotFoundError(f"{what} not found in {host}")
                if resp.status_code != 200:
                    raise await self._status_error(resp, host, what)
                length = _content_length(resp)
                if length is not None and length != desc.size:
                    raise IntegrityError(f"{what}: registry {host} announces {length} "
                                         f"bytes, the manifest says {desc.size}")
                with _mapped_errors(host, self._timeout):
                    # Raw bytes: the digest covers the blob exactly as stored.
                    async for chunk in _raw_body(resp, CHUNK_BYTES):
                        received += len(chunk)
                        if received > desc.size:
                            raise IntegrityError(
                                f"{what}: registry {host} sent more than the "
                                f"{desc.size} bytes the manifest says")
                        await sink.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
            if received < desc.size:
                raise IntegrityError(f"{what}: truncated, got {received} of {desc.size} bytes "
                                     f"from {host}")
            actual = await sink.finish()
            if actual != desc.digest:
                raise IntegrityError(f"{what}: digest mismatch from {host}: expected "
                                     f"{desc.digest}, got {actual}")
        except BaseException:
            await sink.discard()
            raise
        return sink

    # -- HTTP plumbing --

    async def _send(self, url: str, headers: Mapping[str, str], authorization: str | None,
                    host: str, *, method: str = "GET",
                    data: dict[str, str] | None = None,
                    params: httpx.QueryParams | None = None) -> httpx.Response:
        """Send and follow redirects by hand; the response is streaming (caller closes).

        Authorization goes only to the origin of the first URL: a redirect to a CDN or
        another host must not receive the registry's credentials.
        """
        http = await self._client()
        import httpx  # loaded by _client

        with _mapped_errors(host, self._timeout):
            first = httpx.URL(url)
        origin = _origin(first)
        current = first
        seen = {str(first)}
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            if authorization is not None and _origin(current) == origin:
                request_headers["Authorization"] = authorization
            target_host = host if _origin(current) == origin else \
                f"{host} (redirected to {current.netloc.decode(errors='replace')})"
            with _mapped_errors(target_host, self._timeout):
                request = http.build_request(method, current, headers=request_headers,
                                             data=data, params=params)
                resp = await http.send(request, stream=True)
            if resp.status_code not in _REDIRECT_CODES:
                return resp
            location = resp.headers.get("location")
            await resp.aclose()
            if not location:
                raise UnavailableError(f"registry {host} sent a redirect without a Location")
            with _mapped_errors(host, self._timeout):
                current = resp.url.join(location)
            if current.scheme not in ("http", "https"):
                raise UnavailableError(f"registry {host} redirected to unsupported URL "
                                       f"{str(current)!r}")
            if str(current) in seen:
                raise UnavailableError(f"registry {host}: redirect loop at {current}")
            seen.add(str(current))
            # Query/body belong to the original request only.
            params = None
            if resp.status_code == 303:
                method, data = "GET", None
        raise UnavailableError(f"registry {host}: more than {MAX_REDIRECTS} redirects "
                               f"(last to {current})")

    async def _read_bounded(self, resp: httpx.Response, limit: int, host: str,
                            what: str) -> bytes:
        length = _content_length(resp)
        if length is not None and length > limit:
            raise IntegrityError(f"{what}: registry {host} sent {length} bytes, more than "
                                 f"the {limit}-byte limit")
        parts: list[bytes] = []
        total = 0
        with _mapped_errors(host, self._timeout):
            async for chunk in _raw_body(resp, CHUNK_BYTES):
                total += len(chunk)
                if total > limit:
                    raise IntegrityError(f"{what}: registry {host} sent more than the "
                                         f"{limit}-byte limit")
                parts.append(chunk)
        return b"".join(parts)

    async def _status_error(self, resp: httpx.Response, host: str, what: str) -> CripyError:
        """An unexpected status -> UnavailableError quoting the registry's error, if any."""
        detail = ""
        with suppress(CripyError):
            body = await self._read_bounded(resp, MAX_ERROR_BYTES, host, what)
            detail = _registry_error_text(body)
        suffix = f": {detail}" if detail else ""
        if resp.status_code == 429:
            return UnavailableError(f"registry {host} is rate-limiting requests (status 429) "
                                    f"for {what}{suffix}")
        return UnavailableError(f"registry {host} answered status {resp.status_code} for "
                                f"{what}{suffix}")

    # -- auth --

    async def _authorize(self, session: _Session, challenges: list[Challenge],
                         stale: str | None) -> str:
        """The Authorization header answering `challenges`; `stale` was just refused."""
        by_scheme = {c.scheme: c for c in reversed(challenges)}  # first of each wins
        creds = session.creds
        host = session.endpoint.host
        bearer = by_scheme.get("bearer")
        basic = by_scheme.get("basic")
        if bearer is not None:
            if creds is not None and creds.registry_token:
                header = f"Bearer {creds.registry_token}"
                if header == stale:
                    raise session.refused()
                return header
            return await self._bearer(session, bearer, stale)
        if basic is not None:
            user_pass = creds.user_password() if creds is not None else None
            if user_pass is None:
                raise session.refused()
            header = _basic(*user_pass)
            if header == stale:
                raise session.refused()
            return header
        if not challenges:
            raise UnauthenticatedError(f"registry {host} answered 401 without an "
                                       f"authentication challenge for {session.path}")
        schemes = ", ".join(sorted({c.scheme for c in challenges}))
        raise UnauthenticatedError(f"registry {host} asks for unsupported authentication "
                                   f"({schemes}) for {session.path}")

    async def _bearer(self, session: _Session, challenge: Challenge, stale: str | None) -> str:
        host = session.endpoint.host
        realm = challenge.params.get("realm", "")
        if not realm:
            raise UnavailableError(f"registry {host} sent a Bearer challenge without a realm")
        service = challenge.params.get("service", "")
        scopes = [f"repository:{session.path}:pull"]
        extra = challenge.params.get("scope", "")
        if extra and extra not in scopes:
            scopes.append(extra)
        key: _TokenKey = (realm, service, tuple(scopes), session.creds)
        cached = self._tokens.get(key)
        if cached is not None and cached.expires > time.monotonic() \
                and cached.authorization != stale:
            return cached.authorization
        self._tokens.pop(key, None)
        token = await self._fetch_token(session, realm, service, scopes)
        if token.authorization == stale:
            raise session.refused()
        self._prune_tokens()
        self._tokens[key] = token
        return token.authorization

    def _prune_tokens(self) -> None:
        """Keep the cache from growing without bound over a long-lived daemon."""
        if len(self._tokens) < MAX_CACHED_TOKENS:
            return
        now = time.monotonic()
        for key in [k for k, t in self._tokens.items() if t.expires <= now]:
            del self._tokens[key]
        while len(self._tokens) >= MAX_CACHED_TOKENS:
            del self._tokens[next(iter(self._tokens))]  # oldest first (insertion order)

    async def _fetch_token(self, session: _Session, realm: str, service: str,
                           scopes: list[str]) -> _Token:
        creds = session.creds
        realm_host = urlsplit(realm).netloc or realm
        what = f"token for {session.path} from {realm_host}"
        if urlsplit(realm).scheme not in ("http", "https"):
            raise UnavailableError(f"registry {session.endpoint.host} sent an unusable token "
                                   f"realm {realm!r}")
        user_pass = creds.user_password() if creds is not None else None
        resp: httpx.Response | None = None
        try:
            if creds is not None and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": TOKEN_CLIENT_ID, "scope": " ".join(scopes)}
                if service:
                    form["service"] = service
                resp = await self._send(realm, {"Accept": "application/json"}, None,
                                        realm_host, method="POST", data=form)
                if resp.status_code in (404, 405):
                    # Not every token server speaks OAuth2; GET works everywhere.
                    await resp.aclose()
                    resp = None
                    if creds.username:
                        user_pass = (creds.username, creds.identity_token)
            if resp is None:
                import httpx  # loaded: a token is fetched after a request was answered

                params = httpx.QueryParams({"service": service} if service else {})
                for scope in scopes:
                    params = params.add("scope", scope)
                auth = _basic(*user_pass) if user_pass is not None else None
                resp = await self._send(realm, {"Accept": "application/json"}, auth,
                                        realm_host, params=params)
            if resp.status_code in (401, 403):
                raise session.refused()
            if resp.status_code != 200:
                raise await self._status_error(resp, realm_host, what)
            body = await self._read_bounded(resp, MAX_TOKEN_BYTES, realm_host, what)
        finally:
            if resp is not None:
                await resp.aclose()
        return _token_from(body, what)


def _token_from(body: bytes, what: str) -> _Token:
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnavailableError(f"{what}: the answer is not JSON") from exc
    if not isinstance(doc, dict):
        raise UnavailableError(f"{what}: the answer is not a JSON object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise UnavailableError(f"{what}: the answer has no token")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise UnavailableError(f"{what}: the token has invalid characters")
    expires_in = doc.get("expires_in")
    # The spec's default lifetime is 60 s; refresh a little early.
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) \
            or expires_in <= 0:
        expires_in = 60
    lifetime = max(0.0, min(float(expires_in), 86400.0) * 0.9 - 5.0)
    return _Token(authorization=f"Bearer {token}", expires=time.monotonic() + lifetime)


# --- helpers -------------------------------------------------------------------------


@contextmanager
def _mapped_errors(host: str, timeout: float) -> Iterator[None]:
    """httpx failures -> CripyError naming the host; nothing from httpx escapes."""
    import httpx  # loaded by RegistryClient._client before any request

    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise UnavailableError(
            f"registry {host} unreachable: connection timed out after {timeout:g}s") from exc
    except httpx.TimeoutException as exc:
        raise DeadlineExceededError(
            f"registry {host} timed out: nothing received for {timeout:g}s") from exc
    except httpx.ConnectError as exc:
        raise UnavailableError(f"registry {host} unreachable: {_connect_failure(exc)}") \
            from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, UnicodeError) as exc:
        raise UnavailableError(
            f"registry {host}: {type(exc).__name__}: {exc or 'request failed'}") from exc


async def _raw_body(resp: httpx.Response, chunk_size: int) -> AsyncIterator[bytes]:
    """The body as sent (no Content-Encoding decoding: digests cover stored bytes)."""
    if resp.is_stream_consumed:
        # Built in memory (an httpx.MockTransport response): the content is all here.
        content = resp.content
        for i in range(0, len(content), chunk_size):
            yield content[i:i + chunk_size]
        return
    async for chunk in resp.aiter_raw(chunk_size):
        yield chunk


def _connect_failure(exc: BaseException) -> str:
    """The useful part of a connect error ("Connection refused", a TLS or DNS error);
    httpx often says only "All connection attempts failed" and keeps the cause below."""
    best = ""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            break
        if isinstance(current, ssl.SSLError | ssl.CertificateError):
            return f"TLS failure: {current}"
        if isinstance(current, OSError) and current.errno:
            best = os.strerror(current.errno) if current.errno > 0 else str(current)
        current = current.__cause__ or current.__context__
    return best or str(exc) or type(exc).__name__


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def _content_length(resp: httpx.Response) -> int | None:
    value = resp.headers.get("content-length", "").strip()
    return int(value) if value.isdigit() else None


def _basic(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _registry_error_text(body: bytes) -> str:
    """The first error of a registry's JSON error body, shortened; '' if there is none."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return ""
    code = errors[0].get("code")
    message = errors[0].get("message")
    text = ": ".join(str(p) for p in (code, message) if isinstance(p, str) and p)
    return text[:200]
