"""Server reflection under grpc.reflection.v1 and grpc.reflection.v1alpha, method symbols included.

grpcio-reflection's servicer asks the descriptor pool for the file of a symbol, and the upb pool
knows messages, enums, fields and services but not methods: `grpcurl describe pkg.Service.Method`
answered "Symbol not found". This servicer resolves a method through its service. grpcio-reflection
also serves only v1alpha; grpc.reflection.v1 is the same protocol under another package name (same
messages, same field numbers), so both service names share one servicer and v1alpha's message
classes. The v1 file descriptor, v1alpha's renamed, lives in a pool of its own so that it can be
described without claiming its file name in the default pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2

from prefd_server.rpc.middleware import add_generic

V1ALPHA_SERVICE_NAME: str = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
METHOD_NAME = "ServerReflectionInfo"

_Found = TypeVar("_Found")

# The options of upstream grpc/reflection/v1/reflection.proto.
_V1_FILE_OPTIONS = descriptor_pb2.FileOptions(
    go_package="google.golang.org/grpc/reflection/grpc_reflection_v1",
    java_multiple_files=True,
    java_package="io.grpc.reflection.v1",
    java_outer_classname="ServerReflectionProto",
)


def _rename_types(messages: Iterable[descriptor_pb2.DescriptorProto], old: str, new: str) -> None:
    for message in messages:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
        _rename_types(message.nested_type, old, new)


def v1_file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file under the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.options.CopyFrom(_V1_FILE_OPTIONS)
    _rename_types(proto.message_type, old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type.removeprefix(old)
            method.output_type = new + method.output_type.removeprefix(old)
    return proto


def _v1_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(v1_file_descriptor_proto().SerializeToString())
    return pool


def _file_containing_symbol(pool: descriptor_pool.DescriptorPool, symbol: str) -> FileDescriptor:
    try:
        file: FileDescriptor = pool.FindFileContainingSymbol(symbol)
        return file
    except KeyError:
        # `pkg.Service.Method`: the pool finds the service, not its methods.
        service_name, _, method_name = symbol.rpartition(".")
        service = pool.FindServiceByName(service_name)
        if method_name not in service.methods_by_name:
            raise
        method_file: FileDescriptor = service.file
        return method_file


def _error(request: Any, code: grpc.StatusCode, message: str) -> Any:
    return reflection_pb2.ServerReflectionResponse(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=code.value[0], error_message=message),
    )


class ReflectionServicer:
    """Answers ServerReflectionInfo from descriptor pools, searched in order."""

    def __init__(self, service_names: Iterable[str], pools: Sequence[descriptor_pool.DescriptorPool]) -> None:
        self._service_names = tuple(sorted(set(service_names)))
        self._pools = tuple(pools)

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        # Like grpc-go: a file goes out once per stream, except the one a request asks for.
        sent: set[str] = set()
        async for request in requests:
            yield self.answer(request, sent)

    def answer(self, request: Any, sent: set[str]) -> Any:
        """The response to one request; `sent` holds the files this stream already received."""
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                return reflection_pb2.ServerReflectionResponse(
                    original_request=request,
                    list_services_response=reflection_pb2.ListServiceResponse(
                        service=[reflection_pb2.ServiceResponse(name=name) for name in self._service_names]
                    ),
                )
            if kind == "file_by_filename":
                name = request.file_by_filename
                return self._files(request, self._find(lambda pool: pool.FindFileByName(name)), sent)
            if kind == "file_containing_symbol":
                symbol = request.file_containing_symbol
                return self._files(request, self._find(lambda pool: _file_containing_symbol(pool, symbol)), sent)
            if kind == "file_containing_extension":
                extendee = request.file_containing_extension.containing_type
                number = request.file_containing_extension.extension_number

                def extension_file(pool: descriptor_pool.DescriptorPool) -> FileDescriptor:
                    extension = pool.FindExtensionByNumber(pool.FindMessageTypeByName(extendee), number)
                    file: FileDescriptor = pool.FindFileContainingSymbol(extension.full_name)
                    return file

                return self._files(request, self._find(extension_file), sent)
            if kind == "all_extension_numbers_of_type":
                extendee = request.all_extension_numbers_of_type

                def extension_numbers(pool: descriptor_pool.DescriptorPool) -> list[int]:
                    return sorted(e.number for e in pool.FindAllExtensions(pool.FindMessageTypeByName(extendee)))

                return reflection_pb2.ServerReflectionResponse(
                    original_request=request,
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=extendee, extension_number=self._find(extension_numbers)
                    ),
                )
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, f"not found: {_subject(request)}")
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "the request sets none of the known fields")

    def _find(self, lookup: Callable[[descriptor_pool.DescriptorPool], _Found]) -> _Found:
        for pool in self._pools[:-1]:
            try:
                return lookup(pool)
            except KeyError:
                continue
        return lookup(self._pools[-1])

    @staticmethod
    def _files(request: Any, file: FileDescriptor, sent: set[str]) -> Any:
        """`file` first, then each of its transitive imports this stream has not received yet."""
        protos: list[bytes] = []
        queue = [file]
        while queue:
            current = queue.pop(0)
            if current.name in sent and protos:
                continue
            sent.add(current.name)
            proto = descriptor_pb2.FileDescriptorProto()
            current.CopyToProto(proto)
            protos.append(proto.SerializeToString())
            queue.extend(current.dependencies)
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=protos),
        )


def _subject(request: Any) -> str:
    kind = request.WhichOneof("message_request")
    if kind == "file_containing_extension":
        extension = request.file_containing_extension
        return f"extension {extension.extension_number} of {extension.containing_type}"
    return f"{kind} {getattr(request, kind)}"


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (v1 and v1alpha) on `server`, listing `service_names` and both reflection services."""
    servicer = ReflectionServicer(
        (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME), (descriptor_pool.Default(), _v1_pool())
    )
    handlers = {
        METHOD_NAME: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for service_name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        add_generic(server, service_name, handlers)
