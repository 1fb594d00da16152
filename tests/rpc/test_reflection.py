"""Server reflection as operators use it: grpcurl list/describe, and grpc.reflection.v1 next to v1alpha."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import prefd.v1
from prefd_server.app import App

GRPCURL = Path(sys.executable).parent / "grpcurl"
REFLECTION_SERVICES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
# Every service of the prefd.v1 contracts, from the generated modules' descriptors.
PREFD_SERVICES = {
    service.full_name
    for module_info in pkgutil.iter_modules(prefd.v1.__path__, "prefd.v1.")
    if module_info.name.endswith("_pb2")
    for service in importlib.import_module(module_info.name).DESCRIPTOR.services_by_name.values()
}
SERVED = {*PREFD_SERVICES, "grpc.health.v1.Health", *REFLECTION_SERVICES}


async def grpcurl(app: App, *args: str) -> tuple[int, str, str]:
    """Run the real grpcurl against the test server: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-plaintext",
        f"127.0.0.1:{app.port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_grpcurl_lists_every_service_both_reflection_versions_included(app: App) -> None:
    code, out, err = await grpcurl(app, "list")
    assert code == 0, err
    assert set(out.split()) == SERVED


async def test_grpcurl_describes_a_method_of_prefd(app: App) -> None:
    code, out, err = await grpcurl(app, "describe", "prefd.v1.PreferencesService.SetPreferences")
    assert code == 0, err
    assert "prefd.v1.PreferencesService.SetPreferences is a method:" in out
    assert "rpc SetPreferences ( .prefd.v1.SetPreferencesRequest ) returns ( .prefd.v1.SetPreferencesResponse );" in out


async def test_grpcurl_describes_the_health_check_method(app: App) -> None:
    code, out, err = await grpcurl(app, "describe", "grpc.health.v1.Health.Check")
    assert code == 0, err
    assert "grpc.health.v1.Health.Check is a method:" in out
    assert "rpc Check ( .grpc.health.v1.HealthCheckRequest ) returns ( .grpc.health.v1.HealthCheckResponse );" in out


async def test_grpcurl_describes_a_message(app: App) -> None:
    code, out, err = await grpcurl(app, "describe", "prefd.v1.SetPreferencesRequest")
    assert code == 0, err
    assert "prefd.v1.SetPreferencesRequest is a message:" in out
    for field in (
        ".prefd.v1.Scope scope = 1;",
        "repeated .prefd.v1.PreferenceWrite writes = 2;",
        "string reason = 3;",
        "bool dry_run = 4;",
        "string org_id = 5;",
    ):
        assert field in out, out


async def test_grpcurl_describes_every_method_of_every_service(app: App) -> None:
    pool = descriptor_pool.Default()
    methods = [
        method.full_name
        for name in sorted(SERVED - set(REFLECTION_SERVICES))
        for method in pool.FindServiceByName(name).methods
    ]
    methods.append("grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo")
    results = await asyncio.gather(*(grpcurl(app, "describe", method) for method in methods))
    for method, (code, out, err) in zip(methods, results, strict=True):
        assert code == 0, f"{method}: {err}"
        assert f"{method} is a method:" in out


async def test_grpcurl_reports_an_unknown_symbol(app: App) -> None:
    code, _, err = await grpcurl(app, "describe", "prefd.v1.PreferencesService.NoSuchMethod")
    assert code != 0
    assert "Symbol not found" in err


def request(**field: str) -> reflection_pb2.ServerReflectionRequest:
    return reflection_pb2.ServerReflectionRequest(host="", **field)


def file_protos(response: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


def pool_of(files: list[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding `files`; fails if an import among them is missing."""
    pool = descriptor_pool.DescriptorPool()
    pending = {f.name: f for f in files}
    while pending:
        ready = [f for f in pending.values() if all(dep not in pending for dep in f.dependency)]
        assert ready, f"imports missing or circular: {sorted(pending)}"
        for file in ready:
            pool.Add(file)
            del pending[file.name]
    return pool


@pytest.mark.parametrize("service", REFLECTION_SERVICES)
async def test_raw_reflection_resolves_methods_and_answers_not_found_in_band(channel, service: str) -> None:
    info = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        request(list_services="*"),
        request(file_containing_symbol="prefd.v1.PreferencesService.SetPreferences"),
        request(file_containing_symbol="prefd.v1.NoSuchThing"),
        request(file_containing_symbol="grpc.health.v1.Health.Check"),
        request(file_containing_symbol="grpc.reflection.v1.ServerReflection.ServerReflectionInfo"),
        request(file_by_filename="prefd/v1/common.proto"),
    ]
    call = info(iter(requests))
    async with asyncio.timeout(10):
        responses = [response async for response in call]
    assert await call.code() == grpc.StatusCode.OK
    assert [r.original_request for r in responses] == requests
    listed, method, unknown, health_check, reflection_info, by_name = responses

    assert {s.name for s in listed.list_services_response.service} == SERVED

    # The method's file comes first, with every file it imports (this stream has sent none yet).
    files = file_protos(method)
    assert files[0].name == "prefd/v1/preferences.proto"
    resolved = pool_of(files).FindMethodByName("prefd.v1.PreferencesService.SetPreferences")
    assert resolved.input_type.full_name == "prefd.v1.SetPreferencesRequest"

    # An unknown symbol is an answer on the stream, which goes on.
    assert unknown.WhichOneof("message_response") == "error_response"
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "prefd.v1.NoSuchThing" in unknown.error_response.error_message

    health_files = file_protos(health_check)
    assert health_files[0].name == health_pb2.DESCRIPTOR.name
    assert [s.name for s in health_files[0].service] == ["Health"]

    (v1_file,) = file_protos(reflection_info)
    assert (v1_file.name, v1_file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    (v1_method,) = v1_file.service[0].method
    assert (v1_method.input_type, v1_method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )
    assert {m.name for m in v1_file.message_type} >= {"ServerReflectionRequest", "ServerReflectionResponse"}
    pool_of([v1_file])  # self-contained and well-formed

    assert [f.name for f in file_protos(by_name)] == ["prefd/v1/common.proto"]
