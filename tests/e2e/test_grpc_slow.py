"""The slow gRPC suites (CI runs them with `pytest -m slow -n 0`): a 1 GiB bidirectional stream and a 10-minute
idle stream, each through a joined mesh. A grpcio client calls a bytes-in, bytes-out echo method through its
group's gateway ("shop"), which carries the call over mTLS HTTP/2 to the owning group's gateway ("rpc"), which
calls the app over h2c.

- 1 GiB each way in 64 KiB messages arrives whole (counts and SHA-256 on both ends), and neither gateway's RSS
  grows by more than 64 MiB: flow control, not buffering, carries the stream.
- A stream quiet for 10.5 minutes under a 15-minute `timeouts.stream_idle` is cut by nothing else (per-try,
  request timeout, connections' idle timeouts, sweeps), and carries a message afterwards; under a 2 s
  `stream_idle` the same quiet stream ends with DEADLINE_EXCEEDED from the gateway.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc  # type: ignore[import-untyped]
import psutil
import pytest

from tests.conftest import Gateway, metric, service, wait_for
from tests.e2e.mesh import caller_and_owner

LASTING = "echo"  # stream_idle 15m
BRIEF = "brief"  # stream_idle 2s, on the same app
METHOD = "/meshgate.test.Echo/Echo"
MESSAGE = 64 * 1024
TOTAL = 1 << 30  # bytes each way
RSS_GROWTH = 64 << 20
QUIET = 10 * 60 + 30.0  # seconds the idle stream sends nothing


@dataclass
class EchoCall:
    """What the app saw of one call: bytes and messages received, and their SHA-256."""

    size: int = 0
    messages: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)


class EchoServer:
    """`/meshgate.test.Echo/Echo` on 127.0.0.1 over h2c: every request message comes back as it is."""

    def __init__(self) -> None:
        self._executor = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="echo")
        self._server = grpc.server(self._executor, maximum_concurrent_rpcs=8)
        handler = grpc.stream_stream_rpc_method_handler(self._echo)  # no (de)serializers: bytes in, bytes out
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("meshgate.test.Echo", {"Echo": handler})]
        )
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        self.calls: list[EchoCall] = []

    def _echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        seen = EchoCall()
        self.calls.append(seen)
        for message in requests:
            seen.size += len(message)
            seen.messages += 1
            seen.digest.update(message)
            yield message

    def __enter__(self) -> EchoServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(None).wait(10)
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class EchoMesh:
    caller: Gateway
    owner: Gateway
    app: EchoServer

    def channel(self, authority: str) -> grpc.Channel:
        host, port = self.caller.addresses["outbound"]
        return grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", authority)])


@pytest.fixture(scope="module")
def echo_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoMesh]:
    with EchoServer() as app:
        endpoint = f"127.0.0.1:{app.port}"
        services = {
            LASTING: service(endpoint, protocol="grpc", timeouts={"stream_idle": "15m"}),
            BRIEF: service(endpoint, protocol="grpc", timeouts={"stream_idle": "2s"}),
        }
        with caller_and_owner(tmp_path_factory.mktemp("mesh"), services) as (_, caller, owner):
            mesh = EchoMesh(caller, owner, app)
            for authority in (LASTING, BRIEF):
                with mesh.channel(authority) as channel:
                    wait_for(functools.partial(_echoes, channel), 15, what=f"shop reaches {authority}")
            yield mesh


def _echoes(channel: grpc.Channel) -> bool:
    try:
        return list(channel.stream_stream(METHOD)(iter([b"ping"]), timeout=5)) == [b"ping"]
    except grpc.RpcError:
        return False


def calls_ended(mesh: EchoMesh, destination: str, grpc_status: str) -> tuple[float, float]:
    """meshgate_requests_total at (caller, owner) for `destination` with `grpc_status`."""
    count = functools.partial(metric, name="meshgate_requests_total", destination=destination, grpc_status=grpc_status)
    return count(mesh.caller), count(mesh.owner)


def tree_rss(pid: int) -> int:
    """The resident memory of a gateway process and its children (its workers, under --workers)."""
    top = psutil.Process(pid)
    total = 0
    for proc in [top, *top.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue  # a worker that exited between listing and reading holds no memory
    return int(total)


class PeakRss:
    """Samples each gateway's RSS every 50 ms in a thread while the block runs: `before` and `peak` by name."""

    def __init__(self, gateways: dict[str, Gateway]) -> None:
        self.pids = {name: gateway.proc.pid for name, gateway in gateways.items()}
        self.before = {name: tree_rss(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._take()

    def _take(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], tree_rss(pid))

    def growth(self) -> dict[str, int]:
        return {name: self.peak[name] - self.before[name] for name in self.pids}

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()  # the end of the stream is a sample too


def messages(count: int, seed: int) -> Iterator[bytes]:
    """`count` distinct 64 KiB messages: a pool of random blocks, each message stamped with its index."""
    rng = random.Random(seed)
    pool = [rng.randbytes(MESSAGE) for _ in range(17)]
    for index in range(count):
        yield index.to_bytes(8, "big") + pool[index % len(pool)][8:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_1gib_bidirectional_stream_arrives_whole_and_no_gateway_grows_by_64mib(echo_mesh: EchoMesh) -> None:
    count = TOTAL // MESSAGE
    sent = hashlib.sha256()

    def outgoing() -> Iterator[bytes]:
        for message in messages(count, seed=1):
            sent.update(message)
            yield message

    received, size, received_count = hashlib.sha256(), 0, 0
    gateways = {"caller": echo_mesh.caller, "owner": echo_mesh.owner}
    calls_before = len(echo_mesh.app.calls)
    ok_before = calls_ended(echo_mesh, LASTING, "0")
    with echo_mesh.channel(LASTING) as channel, PeakRss(gateways) as rss:
        started = time.monotonic()
        call = channel.stream_stream(METHOD)(outgoing(), timeout=240)
        for reply in call:
            received.update(reply)
            size += len(reply)
            received_count += 1
        elapsed = time.monotonic() - started
        assert call.code() is grpc.StatusCode.OK, call.details()
    print(f"1 GiB each way in {elapsed:.1f} s; RSS before {rss.before}, peak {rss.peak}, growth {rss.growth()}")
    (app,) = echo_mesh.app.calls[calls_before:]
    assert (app.size, app.messages, app.digest.hexdigest()) == (TOTAL, count, sent.hexdigest())
    assert (size, received_count, received.hexdigest()) == (TOTAL, count, sent.hexdigest())
    assert all(growth <= RSS_GROWTH for growth in rss.growth().values()), (rss.before, rss.peak)
    ok_after = tuple(before + 1 for before in ok_before)
    wait_for(lambda: calls_ended(echo_mesh, LASTING, "0") == ok_after, 5, what="the call counted OK on each side")


class DuplexCall:
    """An echo call the test feeds one message at a time: `send` a message, `take` the next reply."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self._outgoing: queue.Queue[bytes | None] = queue.Queue()
        self.call = channel.stream_stream(METHOD)(iter(self._outgoing.get, None), timeout=timeout)

    def send(self, message: bytes) -> None:
        self._outgoing.put(message)

    def take(self) -> bytes:
        return bytes(next(self.call))

    def send_end(self) -> None:
        self._outgoing.put(None)

    def close(self) -> list[bytes]:
        """End the request stream; the replies still to come."""
        self.send_end()
        return list(self.call)


@pytest.mark.slow
@pytest.mark.timeout(QUIET + 180)
def test_a_stream_idle_for_10_minutes_under_a_15m_stream_idle_carries_on(echo_mesh: EchoMesh) -> None:
    ok_before = calls_ended(echo_mesh, LASTING, "0")
    with echo_mesh.channel(LASTING) as channel:
        call = DuplexCall(channel, timeout=QUIET + 120)
        call.send(b"before")
        assert call.take() == b"before"
        quiet_until = time.monotonic() + QUIET
        # Nothing on the stream for 10.5 minutes: the wait is the test. Watching the call meanwhile (grpcio ends
        # it on the status the gateway sends) shows when it was cut, and fails the test then.
        while (left := quiet_until - time.monotonic()) > 0:
            assert call.call.is_active(), f"cut after {QUIET - left:.0f} s quiet: {call.call.details()}"
            time.sleep(min(left, 1.0))
        assert call.call.is_active(), call.call.details()
        call.send(b"after")
        assert call.take() == b"after"
        assert call.close() == []
        assert call.call.code() is grpc.StatusCode.OK, call.call.details()
    ok_after = tuple(before + 1 for before in ok_before)
    wait_for(lambda: calls_ended(echo_mesh, LASTING, "0") == ok_after, 5, what="the call counted OK on each side")


def test_a_stream_idle_past_a_2s_stream_idle_ends_with_deadline_exceeded_from_the_gateway(
    echo_mesh: EchoMesh,
) -> None:
    deadline_before = calls_ended(echo_mesh, BRIEF, "4")
    with echo_mesh.channel(BRIEF) as channel:
        call = DuplexCall(channel, timeout=30)
        call.send(b"before")
        assert call.take() == b"before"
        quiet_from = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            call.take()  # nothing is sent: only the gateway can end the call
        elapsed = time.monotonic() - quiet_from
        call.send_end()  # grpcio's thread feeding the request stream waits on the queue
    print(f"ended after {elapsed:.2f} s quiet: {ended.value.code()} {ended.value.details()!r}")
    assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, ended.value
    assert "meshgate" in (ended.value.details() or ""), ended.value.details()
    assert 2.0 <= elapsed < 4.5, elapsed  # 2 s idle, plus up to a sweep (0.5 s) at each gateway
    # The caller's gateway counts the call it ended (or passed on from the owner's) as DEADLINE_EXCEEDED.
    wait_for(lambda: calls_ended(echo_mesh, BRIEF, "4")[0] == deadline_before[0] + 1, 5, what="DEADLINE_EXCEEDED")
