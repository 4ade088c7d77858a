"""ExecSync output: stdout and stderr share one cap, so the reply fits a gRPC message."""

from __future__ import annotations

import asyncio
import os

import pytest

from cripy.api import api_pb2 as pb
from cripy.daemon import MAX_MESSAGE_BYTES
from cripy.oci.runtime import EXEC_OUTPUT_LIMIT, _Budget, _collect


@pytest.mark.parametrize("stdout_share", [0, 1, EXEC_OUTPUT_LIMIT // 2, EXEC_OUTPUT_LIMIT])
def test_a_full_reply_fits_the_message_limit(stdout_share: int) -> None:
    reply = pb.ExecSyncResponse(stdout=b"o" * stdout_share,
                                stderr=b"e" * (EXEC_OUTPUT_LIMIT - stdout_share),
                                exit_code=-(2**31))
    assert reply.ByteSize() <= MAX_MESSAGE_BYTES
    assert EXEC_OUTPUT_LIMIT > 16 * 1024 * 1024 - 64  # 16 MiB, less the framing


def test_the_streams_share_one_budget_first_come_first_kept() -> None:
    async def main() -> tuple[bytes, bytes, bytes]:
        budget = _Budget(10)
        out, err, alone = bytearray(), bytearray(), bytearray()
        for into, data, shared in ((out, b"x" * 6, budget), (err, b"y" * 6, budget),
                                   (alone, b"z" * 6, None)):
            r, w = os.pipe()
            os.write(w, data)
            os.close(w)
            try:
                await _collect(r, into, shared)
            finally:
                os.close(r)
        return bytes(out), bytes(err), bytes(alone)

    out, err, alone = asyncio.run(main())
    assert (out, err) == (b"x" * 6, b"y" * 4)  # the rest was read and dropped
    assert alone == b"z" * 6  # without a shared budget: a limit of its own


def test_a_spent_budget_keeps_nothing() -> None:
    budget = _Budget(3)
    assert budget.keep(b"abcd") == b"abc"
    assert budget.keep(b"ef") == b""
    assert budget.left == 0
