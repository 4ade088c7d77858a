"""What every RPC handler shares: error mapping, logging, and UNIMPLEMENTED stubs."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from cripy.errors import CripyError
from cripy.metrics import record_rpc

log = logging.getLogger("cripy.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def rpc(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn runtime errors into gRPC statuses and log each call with its duration."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        started = time.monotonic()

        def done(code: str | None) -> None:
            # Before the status goes out: a client that has its answer sees it counted.
            record_rpc(name, time.monotonic() - started, code)

        try:
            response = await handler(self, request, context)
        except CripyError as exc:
            done(exc.code)
            log.info("%s failed: %s: %s", name, exc.code, exc)
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            done("CANCELLED")
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                done("UNKNOWN")
                raise
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # A full disk is the node's condition, not a bug: say so plainly.
                done("RESOURCE_EXHAUSTED")
                log.error("%s failed: out of disk space: %s", name, exc)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{name}: no space left on device: {exc}")
                raise
            done("INTERNAL")
            log.exception("%s failed unexpectedly", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error: {exc}")
            raise
        done(None)
        log.debug("%s ok in %.1f ms", name, (time.monotonic() - started) * 1000)
        return response

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
