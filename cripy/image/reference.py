"""Image references: parsing and normalisation (pure).

Follows the distribution reference grammar and the normalisation the kubelet and docker
apply: a reference without a registry lives on docker.io, a single-component docker.io
repository lives under `library/`, and `latest` is the tag when neither a tag nor a
digest is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cripy.errors import InvalidArgumentError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?"
)

# re.ASCII: \w must not accept non-ASCII letters.
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_ANY_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_IMAGE_ID_RE = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def is_digest(text: str) -> bool:
    """True for a digest this runtime supports (`sha256:` + 64 lowercase hex)."""
    return _DIGEST_RE.fullmatch(text) is not None


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference; InvalidArgumentError if it is malformed."""

    def bad(problem: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"invalid image reference {text!r}: {problem}")

    if not text:
        raise InvalidArgumentError("invalid image reference '': empty")
    if _IMAGE_ID_RE.fullmatch(text):
        raise bad("a 64-character hex string is an image ID, not a repository name")

    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            if _ANY_DIGEST_RE.fullmatch(digest) and not digest.startswith("sha256:"):
                raise bad(f"unsupported digest algorithm in {digest!r} (only sha256)")
            raise bad(f"malformed digest {digest!r} (want sha256: and 64 lowercase hex)")

    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):  # a colon before the last slash is a registry port
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise bad(f"malformed tag {tag!r}")

    if not rest:
        raise bad("empty repository name")
    domain, path = _split_domain(rest)
    if not _DOMAIN_RE.fullmatch(domain):
        raise bad(f"malformed registry host {domain!r}")
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    if not _PATH_RE.fullmatch(path):
        if _PATH_RE.fullmatch(path.lower()):
            raise bad(f"repository name {path!r} must be lowercase")
        raise bad(f"malformed repository name {path!r}")
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise bad(f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def _split_domain(name: str) -> tuple[str, str]:
    """The first component is a registry iff it has a '.' or ':' or is 'localhost'."""
    slash = name.find("/")
    if slash == -1:
        return DEFAULT_DOMAIN, name
    first = name[:slash]
    if "." in first or ":" in first or first == "localhost":
        return first, name[slash + 1:]
    return DEFAULT_DOMAIN, name
