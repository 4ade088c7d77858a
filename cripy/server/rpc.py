"""What every RPC handler shares: error mapping, logging, metrics, UNIMPLEMENTED stubs."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from cripy.errors import CripyError, ErrorCode
from cripy.metrics import record_rpc

log = logging.getLogger("cripy.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]
StreamHandler = Callable[[Any, Req, Context], AsyncIterator[Resp]]


class _Call:
    """One RPC: its metrics (recorded before the status goes out, so a client that has
    its answer sees it counted) and how a failure becomes a gRPC status."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()

    def done(self, code: ErrorCode | None) -> None:
        record_rpc(self.name, time.monotonic() - self.started, code)

    async def fail(self, exc: BaseException, context: Context) -> None:
        """Answer `exc` (abort raises); cancellations and aborts pass through."""
        name = self.name
        if isinstance(exc, CripyError):
            self.done(exc.code)
            log.info("%s failed: %s: %s", name, exc.code, exc)
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client left
            self.done(ErrorCode.CANCELLED)
        elif isinstance(exc, grpc.aio.AbortError):
            self.done(ErrorCode.UNKNOWN)
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A full disk is the node's condition, not a bug: say so plainly.
            self.done(ErrorCode.RESOURCE_EXHAUSTED)
            log.error("%s failed: out of disk space: %s", name, exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{name}: no space left on device: {exc}")
        elif isinstance(exc, Exception):
            self.done(ErrorCode.INTERNAL)
            log.exception("%s failed unexpectedly", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error: {exc}")

    def succeeded(self) -> None:
        self.done(None)
        log.debug("%s ok in %.1f ms", self.name, (time.monotonic() - self.started) * 1000)


def rpc(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn runtime errors into gRPC statuses and log each call with its duration."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        call = _Call(handler.__name__)
        try:
            response = await handler(self, request, context)
        except BaseException as exc:
            await call.fail(exc, context)
            raise
        call.succeeded()
        return response

    return wrapper


def rpc_stream(handler: StreamHandler[Req, Resp]) -> StreamHandler[Req, Resp]:
    """`rpc` for server-streaming RPCs: the call lasts until the stream ends."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: Context) -> AsyncIterator[Resp]:
        call = _Call(handler.__name__)
        try:
            async for item in handler(self, request, context):
                yield item
        except BaseException as exc:
            await call.fail(exc, context)
            raise
        call.succeeded()

    return wrapper


def unimplemented_stubs(service: ServiceDescriptor) -> dict[str, Any]:
    """A handler per RPC of `service` that answers UNIMPLEMENTED naming the RPC.

    A servicer class inherits these and overrides what it implements.
    """

    def stub(method_name: str) -> Any:
        async def handler(self: Any, request: Any, context: Context) -> Any:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{service.name}.{method_name} is not implemented by cripy yet",
            )

        handler.__name__ = method_name
        return handler

    return {m.name: stub(m.name) for m in service.methods}
