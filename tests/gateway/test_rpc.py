"""gRPC's rules as the gateway applies them (gateway/rpc.py): codes, grpc-timeout both ways, grpc-message."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from gateway import rpc


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"100m", 0.1), (b"1S", 1.0), (b"2M", 120.0), (b"1H", 3600.0), (b"250u", 0.00025), (b"99999999n", 0.099999999)],
)
def test_grpc_timeout_is_read_in_every_unit(value: bytes, seconds: float) -> None:
    assert rpc.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"m", b"100", b"100x", b"-1S", b"123456789S", b"1.5S", b" 1S"])
def test_a_malformed_grpc_timeout_is_ignored_as_grpc_servers_do(value: bytes) -> None:
    assert rpc.parse_timeout(value) is None


@pytest.mark.parametrize("seconds", [0.0000001, 0.0991234, 1.5, 99.9, 150.0, 86_400.0 * 365])
def test_the_time_left_is_passed_on_rounded_up_in_at_most_eight_digits(seconds: float) -> None:
    encoded = rpc.format_timeout(seconds)
    assert len(encoded) <= 9 and encoded[:-1].isdigit()
    parsed = rpc.parse_timeout(encoded)
    # Never shorter than the time left (to float precision), and longer by less than one unit of the encoding.
    assert parsed is not None and parsed >= min(seconds, 99_999_999) - 1e-9
    assert parsed - seconds < max(1e-6, seconds * 1e-6) or encoded.endswith(b"S")


def test_statuses_outside_the_codes_read_as_unknown() -> None:
    assert [rpc.parse_status(value) for value in (b"0", b"14", b"16")] == [0, 14, 16]
    assert [rpc.parse_status(value) for value in (b"17", b"-1", b"", b"OK", b"014", b"1e1")] == [2, 2, 2, 2, 2, 2]


def test_the_gateways_own_errors_map_to_the_codes_a_grpc_client_understands() -> None:
    assert {status: rpc.NAMES[rpc.from_http(status)] for status in (401, 403, 404, 429, 502, 503, 504, 500)} == {
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "UNIMPLEMENTED",
        429: "RESOURCE_EXHAUSTED",
        502: "UNAVAILABLE",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
        500: "UNKNOWN",
    }


def test_grpc_message_is_percent_encoded_utf8_and_reads_back() -> None:
    message = "meshgate: no route 100% \u00e9\n\x00"
    encoded = rpc.encode_message(message)
    assert encoded.isascii() and b"\n" not in encoded and b"\x00" not in encoded
    assert unquote(encoded.decode("ascii")) == message


def test_only_application_grpc_content_types_are_grpc() -> None:
    assert rpc.is_grpc(b"application/grpc") and rpc.is_grpc(b"application/grpc+proto")
    assert not rpc.is_grpc(b"application/json") and not rpc.is_grpc(b"text/grpc")
