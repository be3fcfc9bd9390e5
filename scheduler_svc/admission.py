"""Admission of a client request: validation, tokenization, idempotent ids, the queue limit.

Text prompts are tokenized with a worker's own tokenizer (fetched over gRPC on connect). A request
must fit some healthy worker: prompt plus ``max_tokens`` within its ``max_model_len`` and within its
total KV blocks (GPU plus host, counted by ``common.kv_budget``): a request is admitted on its
prompt and grows on demand, but it must be able to reach its last token somewhere. A client-chosen
id that already exists attaches to the first run.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

from common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from common.proto.layerkv.v1 import scheduler_pb2
from common.store import RequestRecord
from common.tokenizer import Tokenizer
from common.types import SamplingParams
from common.wire import sampling_from_proto
from scheduler_svc.core import SchedulerCore
from scheduler_svc.requests import WAITING, RequestState, sampling_from_dict, sampling_to_dict
from scheduler_svc.worker_events import WorkerDescription

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


@dataclass(frozen=True)
class Admitted:
    """The request a Generate call streams, and whether this call created it."""

    state: RequestState
    created: bool


@dataclass(frozen=True)
class FleetFacts:
    """What admission checks a request against, read from the healthy workers: computed once per
    ``GenerateStream`` message rather than per request (nothing can change it between requests
    admitted in one pass of the event loop), and per call on ``Generate``."""

    descriptions: list[WorkerDescription]  # the accepting workers that described themselves
    tokenizer: Tokenizer | None  # the first loaded worker tokenizer
    vocab: int  # the smallest vocabulary among them (0: none reported)
    longest: int  # the longest max_model_len among them


def fleet_facts(core: SchedulerCore) -> FleetFacts:
    workers = [h for h in core.pool.handles() if h.accepting and h.description is not None]
    descriptions = [h.description for h in workers if h.description is not None]
    return FleetFacts(
        descriptions=descriptions,
        tokenizer=next((h.tokenizer for h in workers if h.tokenizer is not None), None),
        vocab=min((d.vocab_size for d in descriptions if d.vocab_size), default=0),
        longest=max((d.max_model_len for d in descriptions), default=0),
    )


async def lookup(core: SchedulerCore, request_id: str) -> RequestState | None:
    """The live state of a request, or a finished one rebuilt from Redis (None when unknown)."""
    state = core.requests.get(request_id)
    if state is not None:
        return state
    record = await core.store.get_request(request_id)
    if record is None:
        return None
    tokens = await core.store.get_tokens(request_id)
    return RequestState(record, sampling_from_dict(record.sampling), tokens)


async def submit(
    core: SchedulerCore, request: scheduler_pb2.GenerateRequest, fleet: FleetFacts | None = None
) -> Admitted:
    """Admit ``request``; ``fleet`` is the workers' facts when the caller already has them current
    (read in this pass of the event loop), else they are read here."""
    if fleet is None:
        fleet = fleet_facts(core)
    request_id = request.request_id
    if request_id:
        if not REQUEST_ID_RE.match(request_id):
            raise InvalidArgument(
                f"request_id {request_id[:40]!r} must be 1-128 characters of letters, digits, '_.:-'"
            )
        existing = core.requests.get(request_id)
        if existing is not None:
            return Admitted(existing, created=False)
        # Not in memory: no Redis read before admitting. The create below answers "exists" for an
        # id stored earlier, and a request that fails a check looks there before it is refused, so
        # an existing id still attaches to its first run whatever this call carries.
        try:
            record, sampling = _checked(core, request, request_id, fleet)
        except (InvalidArgument, Unavailable, ResourceExhausted):
            existing = await lookup(core, request_id)
            if existing is not None:
                return Admitted(existing, created=False)
            raise
    else:
        request_id = uuid.uuid4().hex
        record, sampling = _checked(core, request, request_id, fleet)
        if core.store.reachable:
            # An id of our own: no client can have stored or be retrying it, so the record needs no
            # create call ("exists" cannot be the answer); it is saved in front of the next commit.
            # While Redis is away the create call below runs anyway, so the client hears
            # UNAVAILABLE after the read deadline instead of waiting on the outage.
            state = RequestState(record, sampling)
            core.lifecycle.admit_new(state)
            return Admitted(state, created=True)
    created = await core.store.create_request(record, record.arrival_time)
    if not created:  # the id exists: stored before, or a concurrent retry with it won the race
        existing = await lookup(core, request_id)
        if existing is None:
            raise NotFound(f"request {request_id!r} vanished while being created")
        if request_id not in core.requests and existing.record == record:
            created = True  # our own create, retried after its reply was lost: it is ours to admit
        else:
            return Admitted(existing, created=False)
    state = RequestState(record, sampling)
    core.admit(state)  # the queue limit was checked above
    return Admitted(state, created=True)


def _checked(
    core: SchedulerCore, request: scheduler_pb2.GenerateRequest, request_id: str, fleet: FleetFacts
) -> tuple[RequestRecord, SamplingParams]:
    """The request's record once every admission check passed (else the error to answer)."""
    if not fleet.descriptions:
        raise Unavailable("no healthy worker is available; retry later")
    sampling = sampling_from_proto(request.sampling, core.settings.default_max_tokens)
    if request.expected_output_tokens > sampling.max_tokens:
        raise InvalidArgument(
            f"expected_output_tokens ({request.expected_output_tokens}) must be at most max_tokens "
            f"({sampling.max_tokens}); 0 leaves the prediction to the policy"
        )
    kind = request.WhichOneof("prompt")
    if kind == "text":
        tokenizer = fleet.tokenizer
        if tokenizer is None:
            raise Unavailable("no worker tokenizer is loaded yet; retry later")
        if not request.text:
            raise InvalidArgument("the prompt is empty")
        prompt = tokenizer.encode(request.text)
    elif kind == "token_ids":
        prompt = list(request.token_ids.ids)
    else:
        raise InvalidArgument("the request has no prompt (set text or token_ids)")
    if not prompt:
        raise InvalidArgument("the prompt is empty")
    vocab = fleet.vocab
    # max() first (C, one pass): the list only for the error message
    outside = [t for t in prompt if t >= vocab] if vocab and max(prompt) >= vocab else []
    if outside:
        raise InvalidArgument(f"prompt token ids {outside[:5]} are outside the vocabulary [0, {vocab})")
    total = len(prompt) + sampling.max_tokens
    longest = fleet.longest
    if total > longest:
        raise InvalidArgument(
            f"prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) is {total} tokens, "
            f"more than the longest the workers accept ({longest})"
        )
    limit = core.fit_check(core.policy, fleet.descriptions, total)
    if limit is not None:
        raise InvalidArgument(
            f"a request of {len(prompt)} prompt + {sampling.max_tokens} output tokens can never be held by "
            f"any worker {limit}"
        )
    slo = request.slo
    for name, has, value in (
        ("ttft_s", slo.HasField("ttft_s"), slo.ttft_s),
        ("tpot_s", slo.HasField("tpot_s"), slo.tpot_s),
    ):
        if has and not value > 0:
            raise InvalidArgument(f"slo.{name} must be > 0 seconds, got {value}")
    now = time.time()
    record = RequestRecord(
        request_id=request_id,
        status=WAITING,
        prompt_ids=prompt,
        sampling=sampling_to_dict(sampling),
        ttft_slo_s=slo.ttft_s if slo.HasField("ttft_s") else None,
        tpot_slo_s=slo.tpot_s if slo.HasField("tpot_s") else None,
        expected_output_tokens=request.expected_output_tokens,
        text_prompt=kind == "text",
        arrival_time=now,
    )
    if len(core.queue) >= core.queue.limit:
        raise ResourceExhausted(
            f"waiting queue is full ({core.queue.limit} requests, --queue-limit); retry later"
        )
    return record, sampling
