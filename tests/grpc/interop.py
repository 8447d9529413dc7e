"""grpc's interop TestService for meshgate's tests: protos compiled at test time, a server, and the client cases.

The cases follow grpc's doc/interop-test-descriptions.md. Each takes a `grpc.Channel` and the compiled modules,
asserts what the spec asserts, and returns the status code the call ended with, so a test through the gateways
can compare it with the gateway's recorded grpc_status. Only the channel's target differs between a direct run
and one through the mesh.

    pb = compile_protos(tmp_path)
    with TestServiceServer(pb) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert CASES["large_unary"](channel, pb) is grpc.StatusCode.OK

What grpcio cannot show, and so is not asserted: whether a received message had its compressed flag set (the
client side of server_compressed_*), and whether a request message was compressed (the server side of
client_compressed_*: core decompresses before Python sees it and hides `grpc-encoding`). The server therefore
does not implement the spec's CompressedRequest probe; `test_interop_direct` checks the flags on the wire instead.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import queue
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple

import grpc  # type: ignore[import-untyped]
import h2.config
import h2.connection
import h2.events
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_tools import protoc  # type: ignore[import-untyped]

PROTOS = Path(__file__).resolve().parent / "protos"
CALL_TIMEOUT = 10.0  # seconds; every call has a deadline, far above what a case needs
ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
SERVICE = "grpc.testing.TestService"

Modules = types.SimpleNamespace  # empty, messages, test, test_grpc: the generated modules
Case = Callable[[grpc.Channel, Modules], grpc.StatusCode]

_compile_lock = threading.Lock()


def compile_protos(out_dir: Path) -> Modules:
    """Run protoc on protos/ into out_dir and import the result; one out_dir per process (xdist workers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    with _compile_lock:
        if protoc.main([*args, *(str(p) for p in sorted(PROTOS.glob("*.proto")))]) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        # The generated test_pb2 imports `empty_pb2` and `messages_pb2` as top-level modules. A second call in the
        # same process gets the modules imported first: protobuf's descriptor pool is per process anyway.
        sys.path.insert(0, str(out_dir))
        try:
            names = {"empty": "empty_pb2", "messages": "messages_pb2", "test": "test_pb2", "test_grpc": "test_pb2_grpc"}
            return types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})
        finally:
            sys.path.remove(str(out_dir))


def status_code(number: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == number)


def _payload(pb: Modules, size: int) -> Any:
    return pb.messages.Payload(type=pb.messages.COMPRESSABLE, body=bytes(size))


class _TestService:
    """TestService per the interop spec's server features; grpcio finds the methods by name."""

    def __init__(self, pb: Modules) -> None:
        self.pb = pb
        self.empty_calls = 0  # EmptyCalls served, so a test can see how calls spread over servers
        self.unary_calls = 0  # UnaryCalls, so a test can count retries
        self._lock = threading.Lock()

    @staticmethod
    def _echo_metadata(context: grpc.ServicerContext) -> None:
        received = dict(context.invocation_metadata())
        if ECHO_INITIAL in received:
            context.send_initial_metadata(((ECHO_INITIAL, received[ECHO_INITIAL]),))
        if ECHO_TRAILING in received:
            context.set_trailing_metadata(((ECHO_TRAILING, received[ECHO_TRAILING]),))

    @staticmethod
    def _echo_status(request: Any, context: grpc.ServicerContext) -> None:
        if request.HasField("response_status") and request.response_status.code != 0:
            context.abort(status_code(request.response_status.code), request.response_status.message)

    def _responses(self, request: Any, context: grpc.ServicerContext, compressing: bool) -> Iterator[Any]:
        for parameters in request.response_parameters:
            # interval_us is a delay the spec asks the server to make, not synchronisation
            time.sleep(parameters.interval_us / 1e6)
            if compressing and not parameters.compressed.value:
                context.disable_next_message_compression()
            yield self.pb.messages.StreamingOutputCallResponse(payload=_payload(self.pb, parameters.size))

    def EmptyCall(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.empty_calls += 1
        self._echo_metadata(context)
        return self.pb.empty.Empty()

    def UnaryCall(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.unary_calls += 1
        # expect_compressed is not checked: grpcio does not tell a handler whether the request was compressed.
        if request.response_compressed.value:
            context.set_compression(grpc.Compression.Gzip)  # before the metadata: grpc-encoding is a header
        self._echo_metadata(context)
        self._echo_status(request, context)
        return self.pb.messages.SimpleResponse(payload=_payload(self.pb, request.response_size))

    def CacheableUnaryCall(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.send_initial_metadata((("cache-control", "max-age=60, public"),))
        body = str(time.time_ns()).encode()
        return self.pb.messages.SimpleResponse(payload=self.pb.messages.Payload(body=body))

    def StreamingOutputCall(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        compressing = any(p.compressed.value for p in request.response_parameters)
        if compressing:
            context.set_compression(grpc.Compression.Gzip)
        self._echo_metadata(context)
        self._echo_status(request, context)
        yield from self._responses(request, context, compressing)

    def StreamingInputCall(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        self._echo_metadata(context)
        size = sum(len(request.payload.body) for request in request_iterator)
        return self.pb.messages.StreamingInputCallResponse(aggregated_payload_size=size)

    def FullDuplexCall(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self._echo_metadata(context)
        for request in request_iterator:
            self._echo_status(request, context)
            yield from self._responses(request, context, compressing=False)

    def HalfDuplexCall(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self._echo_metadata(context)
        requests = list(request_iterator)
        for request in requests:
            self._echo_status(request, context)
            yield from self._responses(request, context, compressing=False)

    def UnimplementedCall(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "UnimplementedCall is never implemented")


class TestServiceServer:
    """grpc.testing.TestService and grpc.health.v1.Health on 127.0.0.1, plaintext HTTP/2 (h2c).

    with TestServiceServer(compile_protos(tmp_path)) as server:
        server.set_serving(False)  # Health/Check now answers NOT_SERVING for "" and the TestService
    """

    __test__ = False  # a server, not a pytest class

    def __init__(self, pb: Modules, port: int = 0, max_workers: int = 32) -> None:
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="interop")
        # Each streaming call holds a worker; a full pool would queue calls silently, so refuse them instead.
        self._server = grpc.server(self._executor, maximum_concurrent_rpcs=max_workers)
        self.service = _TestService(pb)
        pb.test_grpc.add_TestServiceServicer_to_server(self.service, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.set_serving(True)
        self.port: int = self._server.add_insecure_port(f"127.0.0.1:{port}")
        if self.port == 0:
            raise OSError(f"grpc could not listen on 127.0.0.1:{port}")

    def start(self) -> int:
        self._server.start()
        return self.port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            self.health.set(service, status)

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait(CALL_TIMEOUT)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TestServiceServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Outbox:
    """A request iterator the case feeds one message at a time; grpcio reads it on its own thread."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                message = self._queue.get(timeout=CALL_TIMEOUT)
            except queue.Empty:
                return  # never left waiting past a case's deadline, even if the case failed before close()
            if message is self._END:
                return
            yield message


def _stub(channel: grpc.Channel, pb: Modules) -> Any:
    return pb.test_grpc.TestServiceStub(channel)


def _failure(call: Callable[[], object]) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded; the spec expects it to fail")


def _large_request(pb: Modules, **fields: Any) -> Any:
    return pb.messages.SimpleRequest(response_size=314159, payload=_payload(pb, 271828), **fields)


def _assert_large(response: Any) -> None:
    assert len(response.payload.body) == 314159
    assert response.payload.body == bytes(314159)


def _sizes(responses: Sequence[Any]) -> list[int]:
    return [len(response.payload.body) for response in responses]


def _output_request(pb: Modules, sizes: Sequence[int], payload: int = 0, **fields: Any) -> Any:
    parameters = [pb.messages.ResponseParameters(size=size) for size in sizes]
    return pb.messages.StreamingOutputCallRequest(
        response_parameters=parameters, payload=_payload(pb, payload), **fields
    )


def empty_unary(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    response, call = _stub(channel, pb).EmptyCall.with_call(pb.empty.Empty(), timeout=CALL_TIMEOUT)
    assert isinstance(response, pb.empty.Empty)
    return call.code()


def large_unary(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    response, call = _stub(channel, pb).UnaryCall.with_call(_large_request(pb), timeout=CALL_TIMEOUT)
    _assert_large(response)
    return call.code()


def client_compressed_unary(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    stub = _stub(channel, pb)
    probe = _large_request(pb, expect_compressed=pb.messages.BoolValue(value=True))
    try:
        stub.UnaryCall(probe, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:  # a server that checks CompressedRequest refuses the uncompressed probe
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    # else: a grpcio server cannot tell (module docstring); the two calls below are what crosses the mesh
    for expect, compression in ((True, grpc.Compression.Gzip), (False, grpc.Compression.NoCompression)):
        request = _large_request(pb, expect_compressed=pb.messages.BoolValue(value=expect))
        response, call = stub.UnaryCall.with_call(request, compression=compression, timeout=CALL_TIMEOUT)
        _assert_large(response)
        assert call.code() is grpc.StatusCode.OK
    return call.code()


def server_compressed_unary(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    stub = _stub(channel, pb)
    for compressed in (True, False):
        request = _large_request(pb, response_compressed=pb.messages.BoolValue(value=compressed))
        response, call = stub.UnaryCall.with_call(request, timeout=CALL_TIMEOUT)
        _assert_large(response)  # the compressed flag is not visible to a grpcio client (module docstring)
        assert call.code() is grpc.StatusCode.OK
    return call.code()


def client_streaming(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    requests = [pb.messages.StreamingInputCallRequest(payload=_payload(pb, n)) for n in (27182, 8, 1828, 45904)]
    response, call = _stub(channel, pb).StreamingInputCall.with_call(iter(requests), timeout=CALL_TIMEOUT)
    assert response.aggregated_payload_size == 74922
    return call.code()


def client_compressed_streaming(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    stub, messages = _stub(channel, pb), pb.messages
    probe = messages.StreamingInputCallRequest(
        expect_compressed=messages.BoolValue(value=True), payload=_payload(pb, 27182)
    )
    try:
        stub.StreamingInputCall(iter([probe]), timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    # grpcio compresses per call, not per message: the whole second call is gzip; the spec's uncompressed
    # second message would need a per-message write flag that grpcio's Python API does not expose.
    requests = [probe, messages.StreamingInputCallRequest(payload=_payload(pb, 45904))]
    response, call = stub.StreamingInputCall.with_call(
        iter(requests), compression=grpc.Compression.Gzip, timeout=CALL_TIMEOUT
    )
    assert response.aggregated_payload_size == 73086
    return call.code()


def server_streaming(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    request = _output_request(pb, (31415, 9, 2653, 58979))
    call = _stub(channel, pb).StreamingOutputCall(request, timeout=CALL_TIMEOUT)
    responses = list(call)
    assert _sizes(responses) == [31415, 9, 2653, 58979]
    assert all(not any(r.payload.body) for r in responses)
    return call.code()


def server_compressed_streaming(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    messages = pb.messages
    parameters = [
        messages.ResponseParameters(size=31415, compressed=messages.BoolValue(value=True)),
        messages.ResponseParameters(size=92653, compressed=messages.BoolValue(value=False)),
    ]
    request = messages.StreamingOutputCallRequest(response_parameters=parameters)
    call = _stub(channel, pb).StreamingOutputCall(request, timeout=CALL_TIMEOUT)
    assert _sizes(list(call)) == [31415, 92653]
    return call.code()


def ping_pong(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    outbox = _Outbox()
    call = _stub(channel, pb).FullDuplexCall(iter(outbox), timeout=CALL_TIMEOUT)
    try:
        for size, payload in ((31415, 27182), (9, 8), (2653, 1828), (58979, 45904)):
            outbox.put(_output_request(pb, [size], payload))
            assert len(next(call).payload.body) == size
    finally:
        outbox.close()
    assert list(call) == []
    return call.code()


def empty_stream(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    call = _stub(channel, pb).FullDuplexCall(iter([]), timeout=CALL_TIMEOUT)
    assert list(call) == []
    return call.code()


def custom_metadata(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    sent = ((ECHO_INITIAL, "test_initial_metadata_value"), (ECHO_TRAILING, b"\xab\xab\xab"))
    stub = _stub(channel, pb)
    response, unary = stub.UnaryCall.with_call(_large_request(pb), metadata=sent, timeout=CALL_TIMEOUT)
    _assert_large(response)
    duplex = stub.FullDuplexCall(iter([_output_request(pb, [314159], 271828)]), metadata=sent, timeout=CALL_TIMEOUT)
    assert _sizes(list(duplex)) == [314159]
    for call in (unary, duplex):
        assert (ECHO_INITIAL, "test_initial_metadata_value") in call.initial_metadata()
        assert (ECHO_TRAILING, b"\xab\xab\xab") in call.trailing_metadata()
        assert call.code() is grpc.StatusCode.OK
    return duplex.code()


def _assert_echoed_status(channel: grpc.Channel, pb: Modules, message: str, duplex: bool) -> grpc.StatusCode:
    stub, status = _stub(channel, pb), pb.messages.EchoStatus(code=2, message=message)
    unary = _failure(lambda: stub.UnaryCall(pb.messages.SimpleRequest(response_status=status), timeout=CALL_TIMEOUT))
    errors = [unary]
    if duplex:
        request = pb.messages.StreamingOutputCallRequest(response_status=status)
        errors.append(_failure(lambda: list(stub.FullDuplexCall(iter([request]), timeout=CALL_TIMEOUT))))
    for error in errors:
        assert error.code() is grpc.StatusCode.UNKNOWN, error
        assert error.details() == message
    return unary.code()


def status_code_and_message(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    return _assert_echoed_status(channel, pb, "test status message", duplex=True)


def special_status_message(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    message = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
    return _assert_echoed_status(channel, pb, message, duplex=False)


def unimplemented_method(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    error = _failure(lambda: _stub(channel, pb).UnimplementedCall(pb.empty.Empty(), timeout=CALL_TIMEOUT))
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED, error
    return error.code()


def unimplemented_service(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    stub = pb.test_grpc.UnimplementedServiceStub(channel)
    error = _failure(lambda: stub.UnimplementedCall(pb.empty.Empty(), timeout=CALL_TIMEOUT))
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED, error
    return error.code()


def cancel_after_begin(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    outbox = _Outbox()
    future = _stub(channel, pb).StreamingInputCall.future(iter(outbox), timeout=CALL_TIMEOUT)
    try:
        assert future.cancel()
    finally:
        outbox.close()
    assert future.cancelled()
    assert future.code() is grpc.StatusCode.CANCELLED
    return future.code()


def cancel_after_first_response(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    outbox = _Outbox()
    call = _stub(channel, pb).FullDuplexCall(iter(outbox), timeout=CALL_TIMEOUT)
    try:
        outbox.put(_output_request(pb, [31415], 27182))
        assert len(next(call).payload.body) == 31415
        assert call.cancel()
    finally:
        outbox.close()
    error = _failure(lambda: list(call))
    assert error.code() is grpc.StatusCode.CANCELLED, error
    return call.code()


def timeout_on_sleeping_server(channel: grpc.Channel, pb: Modules) -> grpc.StatusCode:
    outbox = _Outbox()
    outbox.put(pb.messages.StreamingOutputCallRequest(payload=_payload(pb, 27182)))
    try:  # no half-close: the server waits for more, and the 1 ms deadline ends the call
        error = _failure(lambda: list(_stub(channel, pb).FullDuplexCall(iter(outbox), timeout=0.001)))
    finally:
        outbox.close()
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED, error
    return error.code()


# The spec's order; cacheable_unary needs a caching proxy and the auth cases need Google credentials.
CASES: dict[str, Case] = {
    case.__name__: case
    for case in (
        empty_unary,
        large_unary,
        client_compressed_unary,
        server_compressed_unary,
        client_streaming,
        client_compressed_streaming,
        server_streaming,
        server_compressed_streaming,
        ping_pong,
        empty_stream,
        custom_metadata,
        status_code_and_message,
        special_status_message,
        unimplemented_method,
        unimplemented_service,
        cancel_after_begin,
        cancel_after_first_response,
        timeout_on_sleeping_server,
    )
}


class WireReply(NamedTuple):
    headers: dict[bytes, bytes]
    messages: list[tuple[bool, bytes]]  # (compressed flag, message bytes as sent, so gzip when the flag is set)
    trailers: dict[bytes, bytes]


def wire_call(
    port: int,
    path: str,
    messages: Sequence[tuple[bool, bytes]],
    host: str = "127.0.0.1",
    authority: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> WireReply:
    """One gRPC call by hand over h2c, to see the per-message compressed flags that grpcio hides (both ways).

    `messages` are (compress, serialized) pairs; compressed ones go out gzip with the flag set. `authority` and
    `headers` (such as a grpc-timeout that this client, unlike grpcio, does not enforce itself) go with the call.
    """
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority or f"{host}:{port}")]
    fields += [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-accept-encoding", "gzip"), *headers]
    if any(compress for compress, _ in messages):
        fields.append(("grpc-encoding", "gzip"))
    body = b"".join(_frame(compress, gzip.compress(data) if compress else data) for compress, data in messages)
    conn.send_headers(stream, fields)
    if len(body) > conn.local_flow_control_window(stream):
        raise ValueError(f"{len(body)} bytes of request exceed the initial flow-control window; send less")
    chunk = conn.max_outbound_frame_size
    for offset in range(0, len(body), chunk):
        conn.send_data(stream, body[offset : offset + chunk])
    conn.end_stream(stream)
    reply = WireReply({}, [], {})
    received, ended = bytearray(), False
    with socket.create_connection((host, port), timeout=CALL_TIMEOUT) as sock:
        sock.sendall(conn.data_to_send())
        while not ended:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{host}:{port} closed the connection before the stream ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    reply.headers.update(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    reply.trailers.update(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True  # after the trailers, or after the headers of a Trailers-Only answer
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"stream reset by {host}:{port}: error code {event.error_code}")
            sock.sendall(conn.data_to_send())
    reply.messages.extend(_unframe(bytes(received)))
    return reply


def _frame(compressed: bool, data: bytes) -> bytes:
    return struct.pack(">?I", compressed, len(data)) + data


def _unframe(data: bytes) -> Iterator[tuple[bool, bytes]]:
    offset = 0
    while offset < len(data):
        compressed, length = struct.unpack_from(">?I", data, offset)
        yield compressed, data[offset + 5 : offset + 5 + length]
        offset += 5 + length


def serve(port: int) -> None:
    """Serve until SIGTERM or SIGINT, after printing "ready <port>"; SIGKILL is what the e2e tests use mid-call."""
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with (
        tempfile.TemporaryDirectory(prefix="interop-protos-") as out_dir,
        TestServiceServer(compile_protos(Path(out_dir)), port=port) as server,
    ):
        print(f"ready {server.port}", flush=True)
        stopping.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.grpc.interop")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve TestService and Health on 127.0.0.1").add_argument(
        "--port", type=int, default=0
    )
    args = parser.parse_args(argv)
    serve(args.port)


if __name__ == "__main__":
    main()
