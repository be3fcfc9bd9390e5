"""Client helpers of the end-to-end tests: Generate/Attach streams folded into one result.

``Streamed.take`` checks that every chunk starts where the previous one ended, so a test that
re-attaches after a disconnect proves that nothing was lost or repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fleet import proto_sampling


@dataclass
class Streamed:
    """What a client saw of one request's stream."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # offset of each chunk (checks nothing was skipped)
    text: str = ""
    final: Any = None  # scheduler_pb2.GenerateFinal, once it came

    def take(self, msg: Any) -> None:
        """Fold one GenerateResponse/AttachResponse into the result, checking offsets are contiguous."""
        self.request_id = msg.request_id or self.request_id
        if msg.HasField("chunk"):
            chunk = msg.chunk
            assert chunk.offset == len(self.token_ids), (
                f"{self.request_id}: chunk at offset {chunk.offset}, expected {len(self.token_ids)}"
            )
            self.offsets.append(chunk.offset)
            self.token_ids.extend(chunk.token_ids)
            self.text += chunk.text_delta
        elif msg.HasField("final"):
            self.final = msg.final


def token_request(prompt: Sequence[int], max_tokens: int, request_id: str = "", **sampling: Any) -> Any:
    from common.proto.layerkv.v1 import scheduler_pb2

    return scheduler_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=scheduler_pb2.TokenIds(ids=list(prompt)),
        sampling=proto_sampling(max_tokens, **sampling),
    )


async def stream_generate(
    stub: Any, request: Any, metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 120.0
) -> Streamed:
    out = Streamed(request_id=request.request_id)
    async for msg in stub.Generate(request, metadata=tuple(metadata), timeout=timeout_s):
        out.take(msg)
    return out


async def stream_attach(stub: Any, request_id: str, into: Streamed, timeout_s: float = 120.0) -> Streamed:
    """Re-attach from the tokens already in ``into`` and fold the rest of the stream into it."""
    from common.proto.layerkv.v1 import scheduler_pb2

    req = scheduler_pb2.AttachRequest(request_id=request_id, offset=len(into.token_ids))
    async for msg in stub.Attach(req, timeout=timeout_s):
        into.take(msg)
    return into
