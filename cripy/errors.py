"""Errors raised below the gRPC layer.

Each class names the code the servers answer with (`ErrorCode`: a gRPC status, and the
HTTP status the status API gives it); the message is what the client sees, so it must
name the offending input.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error code cripy answers with; the value is the grpc.StatusCode name."""

    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    DATA_LOSS = "DATA_LOSS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"

    @property
    def http_status(self) -> int:
        """The status API's answer for this code."""
        return _HTTP_STATUS.get(self, 500)


_HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 409, ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}


class CripyError(Exception):
    """Base class; `code` says how the servers answer it."""

    code = ErrorCode.UNKNOWN


class InvalidArgumentError(CripyError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(CripyError):
    code = ErrorCode.NOT_FOUND


class AlreadyExistsError(CripyError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPreconditionError(CripyError):
    code = ErrorCode.FAILED_PRECONDITION


class UnavailableError(CripyError):
    """A remote party (registry, plugin) could not be reached."""

    code = ErrorCode.UNAVAILABLE


class UnauthenticatedError(CripyError):
    """A registry refused the credentials (or demanded some we do not have)."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(CripyError):
    code = ErrorCode.PERMISSION_DENIED


class DeadlineExceededError(CripyError):
    code = ErrorCode.DEADLINE_EXCEEDED


class IntegrityError(CripyError):
    """Content did not match its digest or size, or a layer tried to escape."""

    code = ErrorCode.DATA_LOSS


class ResourceExhaustedError(CripyError):
    code = ErrorCode.RESOURCE_EXHAUSTED
