from __future__ import annotations

import pytest

from cripy.errors import InvalidArgumentError
from cripy.image.reference import Reference, is_digest, parse_reference

D = "sha256:" + "ab" * 32

# input, domain, path, tag, digest, str()
NORMALISED: list[tuple[str, str, str, str | None, str | None, str]] = [
    ("busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None,
     "docker.io/library/busybox:1.36"),
    ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
    ("user/app/sub", "docker.io", "user/app/sub", "latest", None,
     "docker.io/user/app/sub:latest"),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest"),
    ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None,
     "docker.io/library/busybox:1"),
    ("docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest"),
    ("quay.io/coreos/etcd:v3.5.0", "quay.io", "coreos/etcd", "v3.5.0", None,
     "quay.io/coreos/etcd:v3.5.0"),
    ("quay.io/busybox", "quay.io", "busybox", "latest", None, "quay.io/busybox:latest"),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
    ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None,
     "localhost:5000/app:dev"),
    ("127.0.0.1:5000/x/y:t", "127.0.0.1:5000", "x/y", "t", None, "127.0.0.1:5000/x/y:t"),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None, "[::1]:5000/app:latest"),
    ("Registry.Example.COM/app", "Registry.Example.COM", "app", "latest", None,
     "Registry.Example.COM/app:latest"),
    (f"busybox@{D}", "docker.io", "library/busybox", None, D,
     f"docker.io/library/busybox@{D}"),
    (f"busybox:1.36@{D}", "docker.io", "library/busybox", "1.36", D,
     f"docker.io/library/busybox:1.36@{D}"),
    (f"localhost:5000/app@{D}", "localhost:5000", "app", None, D,
     f"localhost:5000/app@{D}"),
    ("a.b-c--d/g:T_a.g-1", "a.b-c--d", "g", "T_a.g-1", None, "a.b-c--d/g:T_a.g-1"),
    ("my_user/my.app-x__y", "docker.io", "my_user/my.app-x__y", "latest", None,
     "docker.io/my_user/my.app-x__y:latest"),
    ("app:" + "t" * 128, "docker.io", "library/app", "t" * 128, None,
     "docker.io/library/app:" + "t" * 128),
]


@pytest.mark.parametrize(("text", "domain", "path", "tag", "digest", "rendered"), NORMALISED)
def test_normalisation(text: str, domain: str, path: str, tag: str | None,
                       digest: str | None, rendered: str) -> None:
    ref = parse_reference(text)
    assert ref == Reference(domain=domain, path=path, tag=tag, digest=digest)
    assert ref.name == f"{domain}/{path}"
    assert str(ref) == rendered
    # Normalised output parses back to itself.
    assert parse_reference(str(ref)) == ref


# input, a fragment the error message must contain
REJECTED: list[tuple[str, str]] = [
    ("", "empty"),
    ("Busybox", "lowercase"),
    ("user/App", "lowercase"),
    ("quay.io/Coreos/etcd", "lowercase"),
    ("busybox:", "malformed tag"),
    ("busybox:-bad", "malformed tag"),
    ("busybox:" + "t" * 129, "malformed tag"),
    ("busybox:tag with space", "malformed tag"),
    ("busybox:täg", "malformed tag"),
    ("busybox@", "malformed digest"),
    ("busybox@sha256:abc", "malformed digest"),
    ("busybox@sha256:" + "AB" * 32, "malformed digest"),
    ("busybox@sha512:" + "ab" * 64, "unsupported digest algorithm"),
    (f"busybox@{D}@{D}", "malformed digest"),
    ("-busybox", "malformed repository name"),
    ("busy--", "malformed repository name"),
    ("a..b", "malformed repository name"),
    ("a___b", "malformed repository name"),
    ("user//app", "malformed repository name"),
    ("user/app/", "malformed repository name"),
    ("/app", "malformed repository name"),
    ("localhost/", "malformed repository name"),
    ("quay.io/", "malformed repository name"),
    ("bad_host.io/app", "malformed registry host"),
    ("-host.io/app", "malformed registry host"),
    ("host.io:port/app", "malformed registry host"),
    (":tag", "empty repository name"),
    (" busybox", "malformed repository name"),
    ("ab" * 32, "image ID"),
    ("quay.io/" + "a" * 250, "longer than 255"),
]


@pytest.mark.parametrize(("text", "problem"), REJECTED)
def test_rejected(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_reference(text)
    message = str(info.value)
    assert problem in message
    assert repr(text) in message or text == ""


def test_longest_name_accepted() -> None:
    path = "a" * (255 - len("quay.io/"))
    assert parse_reference(f"quay.io/{path}").path == path


def test_is_digest() -> None:
    assert is_digest(D)
    assert not is_digest("sha256:" + "ab" * 31)
    assert not is_digest("latest")
