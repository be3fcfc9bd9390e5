"""The proto contract: buf lint is clean, the committed generated code matches the .proto sources,
and the generated modules round-trip messages and serve real calls with the installed runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio

from common import gen_proto
from common.proto.layerkv.v1 import (
    admin_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

REPO = Path(__file__).resolve().parent.parent


def test_buf_lint_is_clean() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run(
        [str(buf), "lint"], cwd=REPO / "proto", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}\n{result.stderr}"


def test_generated_code_matches_proto_sources() -> None:
    assert gen_proto.stale_files() == []


def test_stale_check_detects_a_changed_descriptor(monkeypatch) -> None:
    # The check must be able to fail: pretend types_pb2 was generated from an older file.
    from google.protobuf import descriptor_pb2

    original = descriptor_pb2.FileDescriptorProto.FromString(types_pb2.DESCRIPTOR.serialized_pb)
    original.message_type[0].field.pop()

    class Fake:
        class DESCRIPTOR:
            serialized_pb = original.SerializeToString()

    real_import = gen_proto.importlib.import_module
    monkeypatch.setattr(
        gen_proto.importlib,
        "import_module",
        lambda name: Fake if name.endswith(".types_pb2") else real_import(name),
    )
    assert gen_proto.stale_files() == ["layerkv/v1/types.proto"]


def test_generated_imports_are_package_relative() -> None:
    for path in (REPO / "common" / "proto" / "layerkv" / "v1").glob("*.py"):
        text = path.read_text()
        assert "from layerkv.v1 import" not in text, path.name
    assert gen_proto.fix_imports("from layerkv.v1 import a_pb2 as x\n") == (
        "from common.proto.layerkv.v1 import a_pb2 as x\n"
    )


def test_gencode_has_no_runtime_version_gate() -> None:
    # Gencode with a runtime-version check refuses older protobuf runtimes (docs/proto.md).
    for path in (REPO / "common" / "proto" / "layerkv" / "v1").glob("*.py"):
        text = path.read_text()
        assert "ValidateProtobufRuntimeVersion" not in text, path.name
        assert "GRPC_GENERATED_VERSION" not in text, path.name


def test_messages_round_trip() -> None:
    request = scheduler_pb2.GenerateRequest(
        request_id="r1",
        token_ids=scheduler_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=types_pb2.SamplingParams(max_tokens=5, temperature=0.5, seed=7),
        slo=types_pb2.Slo(tpot_s=0.05),
    )
    back = scheduler_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert back.WhichOneof("prompt") == "token_ids"
    assert list(back.token_ids.ids) == [1, 2, 3]
    assert back.sampling.HasField("seed") and back.sampling.seed == 7
    assert back.slo.HasField("tpot_s") and not back.slo.HasField("ttft_s")
    spec = admin_pb2.PolicySpec(name="fcfs-full")
    spec.params.update({"x": 1.5})
    assert admin_pb2.PolicySpec.FromString(spec.SerializeToString()).params["x"] == 1.5


class _Worker(worker_pb2_grpc.WorkerServiceServicer):
    async def Describe(self, request, context):
        return worker_pb2.DescribeResponse(worker_id="w", geometry=types_pb2.KvGeometry(num_layers=4))

    async def StreamEvents(self, request, context):
        for i in range(3):
            yield worker_pb2.StreamEventsResponse(admitted_request_ids=[f"r{i}"])


async def test_generated_stubs_serve_real_calls() -> None:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(_Worker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            described = await stub.Describe(worker_pb2.DescribeRequest())
            assert described.worker_id == "w" and described.geometry.num_layers == 4
            events = [e async for e in stub.StreamEvents(worker_pb2.StreamEventsRequest())]
            assert [list(e.admitted_request_ids) for e in events] == [["r0"], ["r1"], ["r2"]]
            # A service that is not registered answers UNIMPLEMENTED, not something else.
            client = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            try:
                await client.GetRequest(scheduler_pb2.GetRequestRequest(request_id="x"))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED
            else:
                raise AssertionError("expected UNIMPLEMENTED")
    finally:
        await server.stop(None)
