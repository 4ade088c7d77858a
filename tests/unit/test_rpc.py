"""The RPC wrapper: one error mapping and one set of metrics for unary and streaming
RPCs alike, and the error code table the status API shares."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from cripy.errors import (
    CripyError,
    ErrorCode,
    FailedPreconditionError,
    NotFoundError,
)
from cripy.metrics import REGISTRY
from cripy.server.rpc import Context, rpc, rpc_stream


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def counted(op: str, code: str | None = None) -> float:
    if code is None:
        found = REGISTRY.get_sample_value("cripy_operations_total", {"operation": op})
    else:
        found = REGISTRY.get_sample_value("cripy_operations_errors_total",
                                          {"operation": op, "code": code})
    return found or 0.0


def servicer(name: str, fail: CripyError | None) -> Any:
    async def stream(self: Any, request: int, context: Context) -> AsyncIterator[int]:
        for i in range(request):
            yield i
        if fail is not None:
            raise fail

    async def unary(self: Any, request: int, context: Context) -> int:
        if fail is not None:
            raise fail
        return request

    stream.__name__ = f"{name}Stream"
    unary.__name__ = name
    return type("S", (), {"Stream": rpc_stream(stream), "Unary": rpc(unary)})()


def test_a_stream_is_counted_and_its_error_mapped() -> None:
    name = f"Events{uuid.uuid4().hex[:6]}"

    async def main() -> None:
        ok = servicer(name, None)
        context = FakeContext()
        got = [i async for i in ok.Stream(3, cast(Context, context))]
        assert got == [0, 1, 2] and context.aborted is None
        assert counted(f"{name}Stream") == 1
        failing = servicer(name, NotFoundError("container 'x' not found"))
        got = []
        with pytest.raises(grpc.aio.AbortError):
            async for i in failing.Stream(2, cast(Context, context)):
                got.append(i)
        assert got == [0, 1]
        assert context.aborted == (grpc.StatusCode.NOT_FOUND, "container 'x' not found")
        assert counted(f"{name}Stream") == 2
        assert counted(f"{name}Stream", "NOT_FOUND") == 1

    asyncio.run(main())


def test_unary_errors_use_the_same_table() -> None:
    name = f"Op{uuid.uuid4().hex[:6]}"

    async def main() -> None:
        context = FakeContext()
        with pytest.raises(grpc.aio.AbortError):
            await servicer(name, FailedPreconditionError("not ready")).Unary(
                1, cast(Context, context))
        assert context.aborted == (grpc.StatusCode.FAILED_PRECONDITION, "not ready")
        assert counted(name, "FAILED_PRECONDITION") == 1

    asyncio.run(main())


def test_every_code_is_a_grpc_status_with_an_http_status() -> None:
    for code in ErrorCode:
        assert grpc.StatusCode[code].name == code.value
    assert ErrorCode.NOT_FOUND.http_status == 404
    assert ErrorCode.FAILED_PRECONDITION.http_status == 409
    assert ErrorCode.DATA_LOSS.http_status == 500
    assert NotFoundError.code is ErrorCode.NOT_FOUND
