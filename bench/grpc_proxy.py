"""gRPC benchmark: unary calls through one meshgate gateway against nginx grpc_pass, both in front of one upstream.

    .venv/bin/python bench/grpc_proxy.py                  # 10 s per run, at 1x1, 16x1 and 16x10 connections x streams
    .venv/bin/python bench/grpc_proxy.py --rounds 3       # interleaved rounds, medians (as bench/proxy.py)
    .venv/bin/python bench/grpc_proxy.py --smoke          # CI: 3 s at 16x10; exit 1 below the floor or on failed calls
    .venv/bin/python bench/grpc_proxy.py --json out.json  # also write every sample and the summary as JSON
    .venv/bin/python bench/grpc_proxy.py --nginx-only     # check the harness without the gateway

Layout, as bench/proxy.py: the proxy under test runs on core 0 (taskset -c 0); h2load (one thread) and the upstream
share core 1. Each call is a POST of one gRPC frame (5-byte header + a small protobuf) with content-type
application/grpc and te: trailers, sent by h2load over h2c with prior knowledge to :authority "bench"; -c
connections each keep -m streams in flight. The upstream is an nginx that answers every call with a canned gRPC
reply frame and a grpc-status: 0 trailer.

The targets are the upstream directly ("direct", to show it is not the bottleneck), nginx grpc_pass through a
keep-alive upstream block (the reference, one worker), the gateway with one worker on its edge listener (the service
has protocol: grpc), and, outside --smoke, the gateway with --workers 2, unpinned. Ratios are taken within a round
and the medians across rounds reported. "cpu us/req" is the user+system time of the target's process tree over the
calls h2load completed.

h2load counts HTTP status codes only, but a gRPC failure is a trailers-only 200 with no body. So every completed
call must also have brought the reply frame: "no reply" is h2load's succeeded calls minus DATA bytes / reply
length. Before and after the measurements each target gets one call through nghttp -v, which must show status 200,
the reply frame and a grpc-status: 0 trailer after it; the gateway's log is scanned for errors at the end.

nginx notes (the upstream and the grpc_pass reference, nginx 1.22 as Debian ships it):
- h2c needs `listen ... http2;` (`http2 on;` only exists from 1.25.1); keepalive_requests also bounds HTTP/2
  streams per connection (default 1000, after which h2load stops using the connection and grpc_pass gets 502s).
- a body with NUL bytes cannot be a `return` string, so the reply is a static file; the static module refuses POST
  with 405, which `error_page 405 =200 /reply.bin` turns into the file. add_trailer sends grpc-status after it.
- answering before the request body arrived makes nginx end the stream with RST_STREAM(NO_ERROR); grpc_pass then
  reads that frame on the reused connection and fails with "upstream sent frame for unknown stream" (a 502). The
  upstream therefore reads the body first: `mirror /drain; mirror_request_body on;`.

Exit status: 0 done, 1 the --smoke floor was missed, 2 the bench could not run (the reason is printed).
Only the standard library is used; it needs nginx, h2load and nghttp (Debian's nghttp2-client) and taskset.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy import (  # bench/, beside this script
    READY_DEADLINE,
    BenchError,
    Cores,
    ProcessSet,
    _interrupt,
    cpu_seconds,
    free_port,
    log_tail,
    nginx_conf,
    pick_cores,
    wait_ready,
)

SERVICE = "bench"
METHOD_PATH = "/bench.Bench/Call"


def grpc_frame(text: bytes) -> bytes:
    message = b"\x0a" + bytes([len(text)]) + text  # protobuf: field 1, a string
    return b"\x00" + struct.pack(">I", len(message)) + message  # uncompressed, big-endian length


REQUEST = grpc_frame(b"meshgate grpc bench request")
REPLY = grpc_frame(b"meshgate grpc bench reply")
Level = tuple[int, int]  # h2load -c connections, -m streams per connection
ALL_LEVELS: tuple[Level, ...] = ((1, 1), (16, 1), (16, 10))
SMOKE_LEVELS: tuple[Level, ...] = ((16, 10),)
WIDE_LEVELS: tuple[Level, ...] = ((16, 1), (16, 10))
# Measured 0.55-0.60 x at 16x10 with libnghttp2 (0.10-0.17 with pure-Python h2) on a 2-core EPYC VM, 2026-12-07;
# a floor at half that catches a 2x regression without flaking on a noisy CI machine.
SMOKE_MIN_RATIO = 0.3
DIRECT, NGINX, MESHGATE = "direct", "nginx-grpc", "meshgate"  # the ratio is MESHGATE / NGINX
TELEMETRY = '{access_log: "off"}'


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int  # root of the target's process tree: CPU time is counted over it
    levels: tuple[Level, ...]
    log: Path


@dataclasses.dataclass(frozen=True)
class H2loadResult:
    rps: float
    mean_ms: float
    done: int
    ok_2xx: int
    non_2xx: int
    failed: int  # h2load's "failed": resets, connection errors, timeouts and non-2xx
    no_reply: int  # completed 2xx calls without the reply frame: trailers-only gRPC errors


@dataclasses.dataclass(frozen=True)
class Sample:
    target: str
    level: Level
    round: int
    rps: float
    mean_ms: float
    done: int
    ok_2xx: int
    non_2xx: int
    failed: int
    no_reply: int
    cpu_us_per_req: float | None


@dataclasses.dataclass(frozen=True)
class Settings:
    duration: float
    rounds: int
    smoke: bool
    nginx_only: bool
    json_path: Path | None
    gateway_cmd: tuple[str, ...]


# --- one call, checked -----------------------------------------------------------------------------------------

_NGHTTP_FIELD = re.compile(r"recv \(stream_id=\d+\) ([^:\s][^:]*|:status): (.*)$")
_NGHTTP_DATA = re.compile(r"recv DATA frame <length=(\d+)")


def nghttp_call(port: int, tmp: Path) -> list[tuple[str, str]]:
    """One gRPC call through nghttp -v: the received header fields and ("DATA", length) in arrival order."""
    body = tmp / "request.bin"
    argv = ["nghttp", "-v", "-n", "-t", "5", "-d", str(body), "-H", "content-type: application/grpc"]
    argv += ["-H", "te: trailers", "-H", f":authority: {SERVICE}", f"http://127.0.0.1:{port}{METHOD_PATH}"]
    done = subprocess.run(argv, capture_output=True, timeout=15, check=False)
    events = []
    for line in done.stdout.decode(errors="replace").splitlines():
        if field := _NGHTTP_FIELD.search(line):
            events.append((field.group(1), field.group(2).strip()))
        elif data := _NGHTTP_DATA.search(line):
            events.append(("DATA", data.group(1)))
    return events


def check_call(name: str, port: int, tmp: Path) -> None:
    events = nghttp_call(port, tmp)
    names = [n for n, _ in events]
    data = sum(int(v) for n, v in events if n == "DATA")
    status = dict(events).get(":status")
    grpc_status = [v for n, v in events if n == "grpc-status"]
    reply_then_trailer = "DATA" in names and "grpc-status" in names[names.index("DATA") :]
    if status != "200" or data != len(REPLY) or grpc_status != ["0"] or not reply_then_trailer:
        shown = "; ".join(f"{n}: {v}" for n, v in events) or "no response"
        raise BenchError(f"{name}: expected 200, the {len(REPLY)}-byte reply and a grpc-status 0 trailer: {shown}")


def wait_listening(name: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{log_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # poll interval, not a readiness guess
    raise BenchError(f"{name} not listening on port {port} after {READY_DEADLINE:.0f} s:\n{log_tail(log)}")


# --- nginx -----------------------------------------------------------------------------------------------------


def upstream_block(port: int, root: Path) -> str:
    return (
        f"    server {{\n        listen 127.0.0.1:{port} http2;\n"
        "        location = /drain { internal; return 204; }\n"
        f"        location / {{\n            root {root}; default_type application/grpc; etag off;\n"
        "            mirror /drain; mirror_request_body on;\n"
        "            error_page 405 =200 /reply.bin; try_files /reply.bin =404;\n"
        "            add_trailer grpc-status 0;\n        }\n    }\n"
    )


def grpc_pass_block(port: int, upstream_port: int) -> str:
    return (
        f"    upstream grpc_bench {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}\n"
        f"    server {{\n        listen 127.0.0.1:{port} http2;\n"
        "        location / { grpc_pass grpc://grpc_bench; }\n    }\n"
    )


def start_nginx(procs: ProcessSet, tmp: Path, name: str, block: Callable[[int], str], cpus: str | None) -> Target:
    prefix = tmp / name
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, block(port)))
    log = prefix / "error.log"
    globals_ = f"daemon off; pid {prefix / 'nginx.pid'};"
    proc = procs.start(["nginx", "-p", str(prefix), "-e", str(log), "-c", str(conf), "-g", globals_], log, cpus)
    wait_listening(name, port, proc, log)
    return Target(name, port, proc.pid, ALL_LEVELS, log)


# --- meshgate --------------------------------------------------------------------------------------------------


def gateway_yaml(ports: Sequence[int], upstream_port: int) -> str:
    inbound, outbound, admin, edge = ports
    listen = f'inbound: "127.0.0.1:{inbound}", outbound: "127.0.0.1:{outbound}", admin: "127.0.0.1:{admin}"'
    return (
        f'gateway:\n  group: bench\n  listen: {{{listen}, edge: "127.0.0.1:{edge}"}}\n  telemetry: {TELEMETRY}\n'
        f"services:\n  {SERVICE}:\n    protocol: grpc\n    subsets:\n"
        f'      v1: {{endpoints: ["127.0.0.1:{upstream_port}"]}}\n'
    )


def start_meshgate(
    procs: ProcessSet, workdir: Path, command: Sequence[str], upstream_port: int, workers: int, cpus: str | None
) -> Target:
    workdir.mkdir()
    ports = [free_port() for _ in range(4)]
    config = workdir / "gateway.yaml"
    config.write_text(gateway_yaml(ports, upstream_port))
    argv = [*command, "gateway", "--config", str(config)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    log = workdir / "gateway.log"
    proc = procs.start(argv, log, cpus)
    wait_ready(workdir.name, ports[2], "/ready", proc, log)
    wait_listening(workdir.name, ports[3], proc, log)  # with --workers, /ready can answer before workers listen
    return Target(workdir.name, ports[3], proc.pid, ALL_LEVELS if workers == 1 else WIDE_LEVELS, log)


def log_errors(log: Path) -> list[str]:
    """The distinct error lines of a gateway log (timestamps dropped), most frequent first, with their counts."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if " ERROR " in line or " CRITICAL " in line or re.match(r"^\w+(\.\w+)*(Error|Exception): ", line):
            key = line.split(" ", 2)[2] if line[:4].isdigit() else line
            counts[key] = counts.get(key, 0) + 1
    return [f"{n} x {key}" for key, n in sorted(counts.items(), key=lambda item: -item[1])]


# --- h2load ----------------------------------------------------------------------------------------------------

_RPS = re.compile(r"^finished in [\d.]+m?s, ([\d.]+) req/s", re.M)
_REQUESTS = re.compile(r"^requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", re.M)
_CODES = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_DATA = re.compile(r"^traffic: .*\((\d+)\) data", re.M)
_MEAN = re.compile(r"^time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_h2load(output: str) -> H2loadResult:
    found = [pattern.search(output) for pattern in (_RPS, _REQUESTS, _CODES, _DATA, _MEAN)]
    rps, requests, codes, data, mean = found
    if rps is None or requests is None or codes is None or data is None or mean is None:
        raise BenchError(f"cannot parse h2load output:\n{output}")
    ok_2xx = int(codes.group(1))
    return H2loadResult(
        rps=float(rps.group(1)),
        mean_ms=float(mean.group(1)) * _UNIT_MS[mean.group(2)],
        done=int(requests.group(1)),
        ok_2xx=ok_2xx,
        non_2xx=sum(int(codes.group(i)) for i in (2, 3, 4)),
        failed=int(requests.group(3)),
        # Completed 2xx calls; a 2xx whose stream the end of the run cut short has no reply yet and is not one.
        no_reply=max(0, int(requests.group(2)) - int(data.group(1)) // len(REPLY)),
    )


def run_h2load(port: int, level: Level, duration: float, cpus: str | None, body: Path) -> H2loadResult:
    conns, streams = level
    argv = ["h2load", "-t1", f"-c{conns}", f"-m{streams}", f"-D{max(1, round(duration))}", "-d", str(body)]
    argv += ["-H", ":method: POST", "-H", f":authority: {SERVICE}", "-H", "content-type: application/grpc"]
    argv += ["-H", "te: trailers", f"http://127.0.0.1:{port}{METHOD_PATH}"]
    cmd = ["taskset", "-c", cpus, *argv] if cpus else argv
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    if done.returncode != 0:
        raise BenchError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_h2load(done.stdout)


def label(level: Level) -> str:
    return f"{level[0]}x{level[1]}"


def measure(targets: Sequence[Target], settings: Settings, cpus: str | None, body: Path) -> list[Sample]:
    levels = [lv for lv in ALL_LEVELS if any(lv in t.levels for t in targets)]
    samples = []
    for rnd in range(settings.rounds):
        order = [*targets[rnd % len(targets) :], *targets[: rnd % len(targets)]]  # interleave, rotated per round
        for level in levels:
            for target in (t for t in order if level in t.levels):
                cpu_before = cpu_seconds(target.pid)
                result = run_h2load(target.port, level, settings.duration, cpus, body)
                cpu = cpu_seconds(target.pid) - cpu_before
                cpu_us = cpu * 1e6 / result.done if result.done else None
                sample = Sample(target.name, level, rnd, cpu_us_per_req=cpu_us, **dataclasses.asdict(result))
                print(f"  round {rnd + 1} {target.name:<12} {label(level):>6} {format_row(sample)}", flush=True)
                samples.append(sample)
    return samples


# --- summary ---------------------------------------------------------------------------------------------------


def median_of(samples: Sequence[Sample], target: str, level: Level) -> Sample | None:
    chosen = [s for s in samples if s.target == target and s.level == level]
    if not chosen:
        return None
    cpu = [s.cpu_us_per_req for s in chosen if s.cpu_us_per_req is not None]
    counts = {k: sum(getattr(s, k) for s in chosen) for k in ("done", "ok_2xx", "non_2xx", "failed", "no_reply")}
    rps, mean_ms = statistics.median(s.rps for s in chosen), statistics.median(s.mean_ms for s in chosen)
    return Sample(target, level, -1, rps, mean_ms, cpu_us_per_req=statistics.median(cpu) if cpu else None, **counts)


def throughput_ratios(samples: Sequence[Sample]) -> dict[str, float]:
    """Per level, the median over rounds of meshgate / nginx-grpc req/s, both from the same round."""
    ratios = {}
    for level in ALL_LEVELS:
        pairs: dict[int, dict[str, float]] = {}
        for s in samples:
            if s.level == level and s.target in (MESHGATE, NGINX):
                pairs.setdefault(s.round, {})[s.target] = s.rps
        values = [p[MESHGATE] / p[NGINX] for p in pairs.values() if len(p) == 2 and p[NGINX]]
        if values:
            ratios[label(level)] = statistics.median(values)
    return ratios


def format_row(s: Sample) -> str:
    cpu = f"{s.cpu_us_per_req:>10.1f}" if s.cpu_us_per_req is not None else f"{'-':>10}"
    bad = s.non_2xx or s.failed or s.no_reply
    flag = f"  ! {s.non_2xx} non-2xx, {s.failed} failed, {s.no_reply} 2xx without reply" if bad else ""
    return f"{s.rps:>10,.0f} {s.mean_ms:>8.3f} {cpu}{flag}"


@dataclasses.dataclass(frozen=True)
class Results:
    samples: list[Sample]
    summary: list[Sample]  # medians per target and level
    throughput_ratio: dict[str, float]  # meshgate / nginx-grpc, by "connections x streams"
    after_load: dict[str, str]  # target -> "ok" or why its check call failed after the measurements
    gateway_errors: dict[str, list[str]]  # gateway target -> distinct error lines of its log


def print_table(results: Results) -> None:
    print(f"\n{'target':<14}{'c x m':>7} {'req/s':>10} {'mean ms':>8} {'cpu us/req':>10}")
    for s in results.summary:
        print(f"{s.target:<14}{label(s.level):>7} {format_row(s)}")
    if results.throughput_ratio:
        cells = "  ".join(f"{lv} {r:.2f}" for lv, r in results.throughput_ratio.items())
        print(f"meshgate/nginx-grpc throughput: {cells}")
    for verdict in results.after_load.values():
        if verdict != "ok":
            print(f"after load, {verdict}")
    for name, lines in results.gateway_errors.items():
        print(f"{name} log: {len(lines)} distinct error lines" + "".join(f"\n    {line[:160]}" for line in lines[:8]))


# --- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per h2load run (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported (default 1)")
    parser.add_argument(
        "--smoke", action="store_true", help=f"CI mode: 3 s at 16x10, fail below {SMOKE_MIN_RATIO} x nginx"
    )
    parser.add_argument("--nginx-only", action="store_true", help="skip the gateway (to check the harness itself)")
    parser.add_argument("--json", type=Path, dest="json_path", metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--gateway-cmd",
        default=f"{sys.executable} -m meshgate.cli",
        help="command that 'gateway --config FILE' is appended to (default: this Python, -m meshgate.cli)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds < 1:
        parser.error("--rounds and --seconds must be at least 1")
    duration = 3.0 if args.smoke else args.seconds
    command = tuple(shlex.split(args.gateway_cmd))
    return Settings(duration, args.rounds, args.smoke, args.nginx_only, args.json_path, command)


def start_targets(procs: ProcessSet, tmp: Path, settings: Settings, cores: Cores) -> list[Target]:
    (tmp / "reply.bin").write_bytes(REPLY)
    upstream = start_nginx(procs, tmp, DIRECT, lambda port: upstream_block(port, tmp), cores.load)
    targets = [upstream, start_nginx(procs, tmp, NGINX, lambda p: grpc_pass_block(p, upstream.port), cores.proxy)]
    if not settings.nginx_only:
        command = settings.gateway_cmd
        targets.append(start_meshgate(procs, tmp / MESHGATE, command, upstream.port, 1, cores.proxy))
        if not settings.smoke:
            targets.append(start_meshgate(procs, tmp / f"{MESHGATE}-2w", command, upstream.port, 2, None))
    if settings.smoke:
        targets = [dataclasses.replace(t, levels=SMOKE_LEVELS) for t in targets]
    for target in targets:
        check_call(target.name, target.port, tmp)
    return targets


def check_after_load(target: Target, tmp: Path) -> str:
    try:
        check_call(target.name, target.port, tmp)
    except BenchError as exc:
        return str(exc)
    return "ok"


def run(settings: Settings, cores: Cores) -> Results:
    with tempfile.TemporaryDirectory(prefix="meshgate-grpc-bench-") as tmpname, ProcessSet() as procs:
        tmp = Path(tmpname)
        body = tmp / "request.bin"
        body.write_bytes(REQUEST)
        targets = start_targets(procs, tmp, settings, cores)
        print(f"ready: {', '.join(t.name for t in targets)}; warming up", flush=True)
        for target in targets:
            run_h2load(target.port, (16, 1), 1.0, cores.load, body)
        samples = measure(targets, settings, cores.load, body)
        after = {t.name: check_after_load(t, tmp) for t in targets}
        errors = {t.name: log_errors(t.log) for t in targets if t.name.startswith(MESHGATE)}
    summary = [m for lv in ALL_LEVELS for t in targets if (m := median_of(samples, t.name, lv))]
    return Results(samples, summary, throughput_ratios(samples), after, errors)


def smoke_verdict(results: Results) -> int:
    ratio = results.throughput_ratio.get(label(SMOKE_LEVELS[0]))
    if ratio is None:
        print("smoke: no meshgate/nginx-grpc ratio was measured (--nginx-only?)")
        return 0
    mine = [s for s in results.summary if s.target == MESHGATE]
    bad = sum(s.non_2xx + s.no_reply for s in mine)
    verdict = f"meshgate reached {ratio:.2f} x nginx grpc_pass at 16x10 (floor {SMOKE_MIN_RATIO})"
    reasons = [f"{bad} calls failed under load (non-2xx or no reply)"] if bad else []
    if results.after_load.get(MESHGATE) != "ok":
        reasons.append(f"meshgate failed the check call after load: {results.after_load.get(MESHGATE)}")
    if ratio < SMOKE_MIN_RATIO:
        reasons.append(verdict)
    if reasons:
        print("smoke FAILED: " + "; ".join(reasons), file=sys.stderr)
        return 1
    print(f"smoke ok: {verdict}")
    return 0


def write_json(path: Path, settings: Settings, cores: Cores, results: Results) -> None:
    document = {
        "settings": {**dataclasses.asdict(settings), "json_path": str(path), "proxy_core": cores.proxy},
        "machine": {"uname": " ".join(os.uname()), "cpus": sorted(os.sched_getaffinity(0)), "python": sys.version},
        **dataclasses.asdict(results),
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    cores = pick_cores()
    try:
        results = run(settings, cores)
    except (BenchError, OSError, subprocess.SubprocessError, http.client.HTTPException) as exc:
        # One boundary for everything that stops a run: missing tools, an h2load timeout, a target gone mid-run.
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every process the bench started was stopped", file=sys.stderr)
        return 130
    print_table(results)
    if settings.json_path:
        write_json(settings.json_path, settings, cores, results)
    return smoke_verdict(results) if settings.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
