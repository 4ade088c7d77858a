"""Errors raised below the gRPC layer.

Each class names the gRPC status code the server answers with; the message is what
the client sees, so it must name the offending input.
"""

from __future__ import annotations


class CripyError(Exception):
    """Base class; `code` is the name of a grpc.StatusCode member."""

    code = "UNKNOWN"


class InvalidArgumentError(CripyError):
    code = "INVALID_ARGUMENT"


class NotFoundError(CripyError):
    code = "NOT_FOUND"


class AlreadyExistsError(CripyError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(CripyError):
    code = "FAILED_PRECONDITION"


class UnavailableError(CripyError):
    """A remote party (registry, plugin) could not be reached."""

    code = "UNAVAILABLE"


class UnauthenticatedError(CripyError):
    """A registry refused the credentials (or demanded some we do not have)."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(CripyError):
    code = "PERMISSION_DENIED"


class DeadlineExceededError(CripyError):
    code = "DEADLINE_EXCEEDED"


class IntegrityError(CripyError):
    """Content did not match its digest or size, or a layer tried to escape."""

    code = "DATA_LOSS"


class ResourceExhaustedError(CripyError):
    code = "RESOURCE_EXHAUSTED"
