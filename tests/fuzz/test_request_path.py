"""The request-path fuzz corpus, replayed: every input in tests/fuzz/corpus/request_path/ goes through the in-memory
gateway in each mode and must keep every invariant of tests/fuzz/invariants.py. The corpus holds hostile shapes
written by hand (named `*.http`) and what `python -m tests.fuzz.request_path` found (named by hash).

Below the replay, the checks are shown to catch the faults they name: a gateway with a planted fault, or a run
with its evidence altered, must fail them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.proxy import DownstreamProtocol
from tests.fuzz.invariants import MODES, Failure, check, replay
from tests.gateway.inmemory import MemoryGateway, RecordingDownstream

CORPUS = Path(__file__).parent / "corpus" / "request_path"

# Inputs that still break an invariant, by file name, with why: replayed as xfail(strict), so a fix shows up as
# XPASS and its entry must go. (Every fault the fuzzer has found so far is fixed; their inputs stay in the corpus.)
KNOWN_FAILURES: dict[str, str] = {}


def corpus() -> list[object]:
    missing = set(KNOWN_FAILURES) - {path.name for path in CORPUS.iterdir()}
    assert not missing, f"KNOWN_FAILURES names inputs not in the corpus: {sorted(missing)}"
    params: list[object] = []
    for path in sorted(CORPUS.iterdir()):
        reason = KNOWN_FAILURES.get(path.name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(path, id=path.name, marks=marks))
    return params


@pytest.fixture(scope="module")
def gateway() -> MemoryGateway:
    return MemoryGateway()


@pytest.mark.parametrize("path", corpus())
def test_corpus_input_keeps_every_invariant(path: Path, gateway: MemoryGateway) -> None:
    failures = replay(path.read_bytes(), gateway)
    assert not failures, "\n".join(f"[{mode}] {failure}" for mode, failure in failures)


# The checks catch what they name.

POST_CHUNKED = b"POST /up HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
TWO_GETS = b"GET /1 HTTP/1.1\r\nHost: hello\r\n\r\nGET /2 HTTP/1.1\r\nHost: hello\r\n\r\n"


class AlteredBody(RecordingDownstream):
    """Writes down the body as read, but hands the gateway another one."""

    def on_body(self, body: bytes) -> None:
        self.parsed[-1].body += body
        DownstreamProtocol.on_body(self, body.upper())


class RaisingOnHeader(RecordingDownstream):
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-boom":
            raise KeyError(value)
        super().on_header(name, value)


def kinds(failures: list[Failure]) -> set[str]:
    return {failure.kind for failure in failures}


@pytest.mark.parametrize(("listener", "step"), MODES)
def test_a_clean_run_passes(listener: str, step: int, gateway: MemoryGateway) -> None:
    run = gateway.run(POST_CHUNKED + TWO_GETS, step, listener)
    assert [bytes(request.body) for request in run.upstream_requests] == [b"abc", b"", b""]
    assert check(run) == []


@pytest.mark.parametrize(("listener", "step"), MODES)
def test_a_body_changed_on_the_way_is_caught(listener: str, step: int) -> None:
    failures = check(MemoryGateway(downstream=AlteredBody).run(POST_CHUNKED, step, listener))
    assert [failure.key for failure in failures] == ["body differs"]


def test_an_exception_inside_the_gateway_is_caught() -> None:
    run = MemoryGateway(downstream=RaisingOnHeader).run(b"GET / HTTP/1.1\r\nHost: hello\r\nX-Boom: 1\r\n\r\n")
    assert "escaped" in kinds(check(run))
    assert any("internal error" in text and "KeyError" in text for text in run.escaped)


def test_a_response_that_never_reached_the_client_is_caught(gateway: MemoryGateway) -> None:
    run = gateway.run(TWO_GETS)
    first = run.client_output.index(b"HTTP/1.1", 1)
    run.client_output = run.client_output[:first]  # as if the second response had been dropped
    assert kinds(check(run)) == {"unanswered"}


def test_bytes_after_a_closing_response_are_caught(gateway: MemoryGateway) -> None:
    run = gateway.run(b"GET / HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")
    run.client_output += b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    assert kinds(check(run)) == {"client-bytes"}


def test_a_leaked_in_flight_count_is_caught(gateway: MemoryGateway) -> None:
    run = gateway.run(TWO_GETS)
    run.runtime.loads["hello"].active += 1
    assert [failure.key for failure in check(run)] == ["in-flight counts not back to zero"]
