"""Proxy benchmark: the meshgate gateway against nginx as a reverse proxy, both in front of the same nginx upstream.

    .venv/bin/python bench/proxy.py                    # 10 s per run, 1/16/64 connections, one round
    .venv/bin/python bench/proxy.py --rounds 3         # interleaved rounds, medians (the method of docs/design.md)
    .venv/bin/python bench/proxy.py --strace           # also system calls per request (strace -c)
    .venv/bin/python bench/proxy.py --smoke            # CI: 3 s at 16 connections; exit 1 below 0.25 x nginx
    .venv/bin/python bench/proxy.py --json out.json    # also write every sample and the summary as JSON
    .venv/bin/python bench/proxy.py --nginx-only       # check the harness without the gateway
    .venv/bin/python bench/proxy.py --gateway-cmd ".venv/bin/meshgate"   # another build or entry point

Layout, as in docs/design.md ("Engines"): the proxy under test runs on core 0 (taskset -c 0); wrk and
the upstream (nginx, ~200-byte body, keep-alive) share core 1. wrk runs with one thread (-t1) everywhere: it is
pinned to a single core that it shares with the upstream, so a second thread would only add context switches.

The targets are the upstream directly, nginx proxying through a keep-alive upstream block (the reference), the
gateway with one worker, and, outside --smoke, the gateway with --workers 2, unpinned, at 16 and 64 connections.
Each round runs every target once per connection count, in an order rotated per round; ratios are taken within a
round, and the medians across rounds are reported. "cpu us/req" is the user+system time of the target's own
process tree (for "direct", the upstream's) over the requests wrk completed.

Exit status: 0 done, 1 the --smoke floor was missed, 2 the bench could not run (the reason is printed).
Only the standard library is used, so it runs anywhere nginx, wrk and taskset do.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
HOST = "bench"
BODY = ("meshgate bench upstream, a fixed body of two hundred bytes. " * 4)[:200]
READY_DEADLINE = 15.0
STOP_DEADLINE = 5.0
ALL_CONNS = (1, 16, 64)
SMOKE_CONNS = (16,)
WIDE_CONNS = (16, 64)
SMOKE_MIN_RATIO = 0.25
STRACE_REQUESTS = 4000
STRACE_CONNS = 16
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NGINX, MESHGATE = "nginx-proxy", "meshgate"  # the pair every ratio compares
DEFAULT_TELEMETRY = '{access_log: "off"}'  # golden signals and the ring of recent requests, nothing exported
# --telemetry: variants of the one-worker gateway, compared with the minimal one and with nginx in the same run.
# "{dir}" is the variant's work directory; "{otlp}" an OTLP/HTTP sink (the upstream nginx answers any POST 200).
MINIMAL = "mg-minimal"
TELEMETRY_VARIANTS = {
    MINIMAL: '{access_log: "off", recent_requests: 0}',
    "mg-access-log": '{access_log: "{dir}/access.log"}',
    "mg-trace-1%": '{access_log: "off", tracing: {endpoint: "{otlp}", sampling: 0.01}}',
    "mg-trace-100%": '{access_log: "off", tracing: {endpoint: "{otlp}", sampling: 1.0}}',
}


class BenchError(Exception):
    """The benchmark could not run: a process failed to start, or a target answered wrongly."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int  # root of the target's process tree: CPU time, peak RSS and strace attach to it
    conns: tuple[int, ...]
    adds_request_id: bool = False


@dataclasses.dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


@dataclasses.dataclass(frozen=True)
class Sample:
    target: str
    conns: int
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    cpu_us_per_req: float | None


@dataclasses.dataclass(frozen=True)
class SyscallCount:
    target: str
    requests: int
    per_request: float
    top: list[tuple[str, float]]  # (syscall, calls per request), most frequent first


@dataclasses.dataclass(frozen=True)
class Settings:
    duration: float
    rounds: int
    strace: bool
    smoke: bool
    nginx_only: bool
    json_path: Path | None
    gateway_cmd: tuple[str, ...]  # what "gateway --config FILE" is appended to
    telemetry: bool = False


@dataclasses.dataclass(frozen=True)
class Cores:
    proxy: str | None  # taskset -c list, or None when the machine has fewer than two usable cores
    load: str | None


# --- /proc -----------------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # Fields from the third on; the second (comm) may hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
    tree = [root]
    for pid in tree:
        tree.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def cpu_seconds(root: int) -> float:
    ticks = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def worker_peak_rss(root: int) -> dict[int, int]:
    """VmHWM in kB of the worker processes: the root's descendants if it has any, else the root itself."""
    tree = process_tree(root)
    return {pid: peak_rss_kb(pid) for pid in (tree[1:] or tree)}


# --- processes -------------------------------------------------------------------------------------------------


class ProcessSet:
    """Every process the bench starts, each in its own session, stopped on exit (also on Ctrl-C or SIGTERM).

    >>> with ProcessSet() as procs:
    ...     proc = procs.start(["sleep", "60"], Path("/tmp/sleep.log"))
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)

    def start(self, argv: Sequence[str], log: Path, cpus: str | None = None) -> subprocess.Popen[bytes]:
        cmd = ["taskset", "-c", cpus, *argv] if cpus else list(argv)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is not None:
            return  # reaped: its id may belong to someone else by now
        # Until it is reaped, the id is ours; its own session makes it the group of its workers too.
        members = process_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in members[1:]:  # workers that outlived their leader, still in its group
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == proc.pid:
                    os.kill(pid, signal.SIGKILL)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pick_cores() -> Cores:
    if {0, 1} <= os.sched_getaffinity(0):
        return Cores(proxy="0", load="1")
    print("warning: cores 0 and 1 are not both available; running unpinned", file=sys.stderr)
    return Cores(proxy=None, load=None)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- readiness and correctness ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(port: int, path: str = "/") -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path, headers={"Host": HOST})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def answers_200(port: int, path: str) -> bool:
    try:
        return http_get(port, path).status == 200
    except (OSError, http.client.HTTPException):
        return False


def wait_ready(what: str, port: int, path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode}:\n{log_tail(log)}")
        if answers_200(port, path):
            return
        time.sleep(0.05)  # poll interval, not a readiness guess
    raise BenchError(f"{what} not ready on port {port}{path} after {READY_DEADLINE:.0f} s:\n{log_tail(log)}")


def verify(target: Target) -> None:
    reply = http_get(target.port)
    if reply.status != 200 or reply.body != BODY.encode():
        raise BenchError(f"{target.name}: expected 200 with the upstream body, got {reply.status} {reply.body[:80]!r}")
    if target.adds_request_id and not reply.headers.get("x-request-id"):
        raise BenchError(f"{target.name}: response has no x-request-id header")


# --- nginx -----------------------------------------------------------------------------------------------------


def nginx_conf(prefix: Path, http_block: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise switch to nobody
    temps = "".join(
        f"    {kind}_temp_path {prefix / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\nevents {{ worker_connections 4096; }}\n"
        f"http {{\n    access_log off;\n    keepalive_requests 1000000;\n{temps}{http_block}}}\n"
    )


def upstream_block(port: int) -> str:
    return (
        f"    server {{\n        listen 127.0.0.1:{port};\n"
        f'        location / {{ default_type text/plain; return 200 "{BODY}"; }}\n    }}\n'
    )


def proxy_block(port: int, upstream_port: int) -> str:
    return (
        f"    upstream bench {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n        location / {{\n"
        "            proxy_pass http://bench;\n            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n        }\n    }\n'
    )


def start_nginx(procs: ProcessSet, tmp: Path, name: str, block: Callable[[int], str], cpus: str | None) -> Target:
    prefix = tmp / name
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, block(port)))
    log = prefix / "error.log"
    globals_ = f"daemon off; pid {prefix / 'nginx.pid'};"
    argv = ["nginx", "-p", str(prefix), "-e", str(log), "-c", str(conf), "-g", globals_]
    proc = procs.start(argv, log, cpus)
    wait_ready(name, port, "/", proc, log)
    return Target(name, port, proc.pid, ALL_CONNS)


# --- meshgate --------------------------------------------------------------------------------------------------


def gateway_yaml(inbound: int, outbound: int, admin: int, upstream_port: int, telemetry: str) -> str:
    return (
        "gateway:\n  group: bench\n"
        f'  listen: {{inbound: "127.0.0.1:{inbound}", outbound: "127.0.0.1:{outbound}", admin: "127.0.0.1:{admin}"}}\n'
        f"  telemetry: {telemetry}\n"
        "services:\n  bench:\n    subsets:\n"
        f'      v1: {{endpoints: ["127.0.0.1:{upstream_port}"]}}\n'
    )


def start_meshgate(
    procs: ProcessSet,
    workdir: Path,
    command: Sequence[str],
    upstream_port: int,
    workers: int,
    cpus: str | None,
    telemetry: str = DEFAULT_TELEMETRY,
) -> Target:
    workdir.mkdir()
    inbound, admin = free_port(), free_port()
    config = workdir / "gateway.yaml"
    config.write_text(
        gateway_yaml(inbound, free_port(), admin, upstream_port, telemetry.replace("{dir}", str(workdir)))
    )
    argv = [*command, "gateway", "--config", str(config)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    log = workdir / "gateway.log"
    proc = procs.start(argv, log, cpus)
    wait_ready(workdir.name, admin, "/ready", proc, log)
    return Target(workdir.name, inbound, proc.pid, ALL_CONNS if workers == 1 else WIDE_CONNS, adds_request_id=True)


# --- wrk -------------------------------------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_PERCENTILE = re.compile(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_WRK_REQUESTS = re.compile(r"^\s+(\d+) requests in ", re.M)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(output: str) -> WrkResult:
    rps, requests = _WRK_RPS.search(output), _WRK_REQUESTS.search(output)
    percentiles = {int(p): float(v) * _UNIT_MS[unit] for p, v, unit in _WRK_PERCENTILE.findall(output)}
    if rps is None or requests is None or not {50, 99} <= percentiles.keys():
        raise BenchError(f"cannot parse wrk output (was --latency given?):\n{output}")
    non_2xx = _WRK_NON_2XX.search(output)
    socket_errors = _WRK_SOCKET_ERRORS.search(output)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        requests=int(requests.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
    )


def run_wrk(port: int, conns: int, duration: float, cpus: str | None) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "-H", f"Host: {HOST}"]
    cmd = ["taskset", "-c", cpus, *argv] if cpus else argv
    done = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=duration + 30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def measure_once(target: Target, conns: int, duration: float, rnd: int, cpus: str | None) -> Sample:
    cpu_before = cpu_seconds(target.pid)
    result = run_wrk(target.port, conns, duration, cpus)
    cpu_us = (cpu_seconds(target.pid) - cpu_before) * 1e6 / result.requests if result.requests else None
    sample = Sample(target.name, conns, rnd, cpu_us_per_req=cpu_us, **dataclasses.asdict(result))
    print(f"  round {rnd + 1} {target.name:<12} {conns:>3}c {format_row(sample)}", flush=True)
    return sample


def measure(targets: Sequence[Target], settings: Settings, cpus: str | None) -> list[Sample]:
    conns_all = sorted({c for t in targets for c in t.conns})
    samples = []
    for rnd in range(settings.rounds):
        order = [*targets[rnd % len(targets) :], *targets[: rnd % len(targets)]]  # interleave, rotated per round
        for conns in conns_all:
            for target in (t for t in order if conns in t.conns):
                samples.append(measure_once(target, conns, settings.duration, rnd, cpus))
    return samples


# --- strace ----------------------------------------------------------------------------------------------------


def tracer_attached(pids: Sequence[int], tracer: int) -> bool:
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            status = (task / "status").read_text()
            if f"TracerPid:\t{tracer}\n" not in status:
                return False
    return True


def fixed_count_load(port: int, requests: int, conns: int) -> None:
    errors: list[str] = []

    def one_connection(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(count):
                conn.request("GET", "/", headers={"Host": HOST})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors.append(f"status {resp.status}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=one_connection, args=(requests // conns,)) for _ in range(conns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"fixed-count run failed: {errors[0]} ({len(errors)} errors)")


def parse_strace_summary(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


def count_syscalls(procs: ProcessSet, tmp: Path, target: Target) -> SyscallCount:
    pids = process_tree(target.pid)
    out = tmp / f"strace-{target.name}.txt"
    argv = ["strace", "-c", "-f", "-o", str(out)] + [arg for pid in pids for arg in ("-p", str(pid))]
    log = tmp / f"strace-{target.name}.log"
    tracer = procs.start(argv, log)
    deadline = time.monotonic() + READY_DEADLINE
    while not tracer_attached(pids, tracer.pid):
        if tracer.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"strace could not attach to {target.name}:\n{log_tail(log)}")
        time.sleep(0.01)
    fixed_count_load(target.port, STRACE_REQUESTS, STRACE_CONNS)
    procs.stop(tracer, signal.SIGINT)  # strace writes its summary when interrupted
    calls = parse_strace_summary(out.read_text())
    top = [(name, n / STRACE_REQUESTS) for name, n in sorted(calls.items(), key=lambda item: -item[1])[:8]]
    return SyscallCount(target.name, STRACE_REQUESTS, sum(calls.values()) / STRACE_REQUESTS, top)


# --- summary ---------------------------------------------------------------------------------------------------


def median_of(samples: Sequence[Sample], target: str, conns: int) -> Sample | None:
    chosen = [s for s in samples if s.target == target and s.conns == conns]
    if not chosen:
        return None
    cpu = [s.cpu_us_per_req for s in chosen if s.cpu_us_per_req is not None]
    return Sample(
        target,
        conns,
        round=-1,
        rps=statistics.median(s.rps for s in chosen),
        p50_ms=statistics.median(s.p50_ms for s in chosen),
        p99_ms=statistics.median(s.p99_ms for s in chosen),
        requests=sum(s.requests for s in chosen),
        non_2xx=sum(s.non_2xx for s in chosen),
        socket_errors=sum(s.socket_errors for s in chosen),
        cpu_us_per_req=statistics.median(cpu) if cpu else None,
    )


def per_round(samples: Sequence[Sample], conns: int, value: Callable[[Sample, Sample], float]) -> float | None:
    """Median over rounds of value(meshgate, nginx), both taken from the same round."""
    pairs: dict[int, dict[str, Sample]] = {}
    for s in samples:
        if s.conns == conns and s.target in (MESHGATE, NGINX):
            pairs.setdefault(s.round, {})[s.target] = s
    values = [value(p[MESHGATE], p[NGINX]) for p in pairs.values() if len(p) == 2]
    return statistics.median(values) if values else None


def throughput_ratios(samples: Sequence[Sample]) -> dict[int, float]:
    ratios = {c: per_round(samples, c, lambda m, n: m.rps / n.rps) for c in ALL_CONNS}
    return {c: r for c, r in ratios.items() if r is not None}


def added_p50_ms(samples: Sequence[Sample]) -> float | None:
    return per_round(samples, 1, lambda m, n: m.p50_ms - n.p50_ms)


def format_row(s: Sample) -> str:
    cpu = f"{s.cpu_us_per_req:>9.1f}" if s.cpu_us_per_req is not None else f"{'-':>9}"
    flag = f"  ! {s.non_2xx} non-2xx, {s.socket_errors} socket errors" if s.non_2xx or s.socket_errors else ""
    return f"{s.rps:>10,.0f} {s.p50_ms:>8.3f} {s.p99_ms:>8.3f} {cpu}{flag}"


def print_table(summary: Sequence[Sample], ratios: dict[int, float], added: float | None, rss_kb: int | None) -> None:
    print(f"\n{'target':<16}{'conns':>6} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10}")
    for s in summary:
        print(f"{s.target:<16}{s.conns:>6} {format_row(s)}")
    parts = []
    if ratios:
        parts.append("meshgate/nginx throughput: " + "  ".join(f"{c}c {r:.2f}" for c, r in ratios.items()))
    if added is not None:
        parts.append(f"added p50 @1c: {added:+.3f} ms")
    if rss_kb is not None:
        parts.append(f"meshgate peak RSS: {rss_kb / 1024:.0f} MB")
    if parts:
        print(" ; ".join(parts))


def print_syscalls(counts: Sequence[SyscallCount]) -> None:
    print(f"\nsystem calls per request (strace -c -f, {STRACE_REQUESTS} requests over {STRACE_CONNS} connections):")
    for count in counts:
        top = ", ".join(f"{name} {per:.2f}" for name, per in count.top)
        print(f"  {count.target:<12} {count.per_request:6.2f} calls/req   top: {top}")


# --- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported (default 1)")
    parser.add_argument("--strace", action="store_true", help="count system calls per request with strace -c")
    parser.add_argument("--smoke", action="store_true", help="CI mode: 3 s at 16 connections, fail below 0.25 x nginx")
    parser.add_argument("--nginx-only", action="store_true", help="skip the gateway (to check the harness itself)")
    parser.add_argument(
        "--telemetry", action="store_true", help="also run telemetry variants (access log, tracing at 1 %% and 100 %%)"
    )
    parser.add_argument("--json", type=Path, dest="json_path", metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--gateway-cmd",
        default=f"{sys.executable} -m meshgate.cli",
        help="command that 'gateway --config FILE' is appended to (default: this Python, -m meshgate.cli)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be at least 1")
    duration = 3.0 if args.smoke else args.duration
    command = tuple(shlex.split(args.gateway_cmd))
    return Settings(
        duration, args.rounds, args.strace, args.smoke, args.nginx_only, args.json_path, command, args.telemetry
    )


def start_targets(procs: ProcessSet, tmp: Path, settings: Settings, cores: Cores) -> list[Target]:
    upstream = start_nginx(procs, tmp, "direct", upstream_block, cores.load)
    targets = [upstream, start_nginx(procs, tmp, NGINX, lambda p: proxy_block(p, upstream.port), cores.proxy)]
    if not settings.nginx_only:
        command = settings.gateway_cmd
        targets.append(start_meshgate(procs, tmp / MESHGATE, command, upstream.port, 1, cores.proxy))
        if not settings.smoke:
            targets.append(start_meshgate(procs, tmp / f"{MESHGATE}-2w", command, upstream.port, 2, None))
        if settings.telemetry:
            otlp = f"http://127.0.0.1:{upstream.port}/v1/traces"
            for name, telemetry in TELEMETRY_VARIANTS.items():
                variant = telemetry.replace("{otlp}", otlp)
                started = start_meshgate(procs, tmp / name, command, upstream.port, 1, cores.proxy, variant)
                targets.append(dataclasses.replace(started, conns=WIDE_CONNS))
    if settings.smoke:
        targets = [dataclasses.replace(t, conns=SMOKE_CONNS) for t in targets]
    for target in targets:
        verify(target)
    return targets


@dataclasses.dataclass(frozen=True)
class Results:
    samples: list[Sample]
    summary: list[Sample]  # medians per target and connection count
    throughput_ratio: dict[int, float]  # meshgate / nginx-proxy, by connection count
    added_p50_ms_1c: float | None
    meshgate_worker_peak_rss_kb: dict[int, int]
    syscalls: list[SyscallCount]


def run(settings: Settings, cores: Cores) -> Results:
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmpname, ProcessSet() as procs:
        tmp = Path(tmpname)
        targets = start_targets(procs, tmp, settings, cores)
        print(f"ready: {', '.join(t.name for t in targets)}; warming up", flush=True)
        for target in targets:
            run_wrk(target.port, 16, 1.0, cores.load)
        samples = measure(targets, settings, cores.load)
        proxies = [t for t in targets if t.name in (NGINX, MESHGATE)]
        syscalls = [count_syscalls(procs, tmp, t) for t in proxies] if settings.strace else []
        rss = {pid: kb for t in targets if t.name == MESHGATE for pid, kb in worker_peak_rss(t.pid).items()}
    summary = [m for c in ALL_CONNS for t in targets if (m := median_of(samples, t.name, c))]
    return Results(samples, summary, throughput_ratios(samples), added_p50_ms(samples), rss, syscalls)


def report(results: Results) -> None:
    rss = results.meshgate_worker_peak_rss_kb
    print_table(results.summary, results.throughput_ratio, results.added_p50_ms_1c, max(rss.values()) if rss else None)
    if results.syscalls:
        print_syscalls(results.syscalls)
    print_telemetry(results.summary)


def print_telemetry(summary: Sequence[Sample]) -> None:
    """Each telemetry variant's throughput against the minimal gateway and nginx (medians, same run)."""
    by = {(s.target, s.conns): s.rps for s in summary}
    names = [MESHGATE, *TELEMETRY_VARIANTS]
    if (MINIMAL, 16) not in by:
        return
    print("\ntelemetry variants (throughput ratio to mg-minimal / to nginx-proxy):")
    for conns in WIDE_CONNS:
        cells = []
        for name in names:
            rps, minimal, nginx = by.get((name, conns)), by.get((MINIMAL, conns)), by.get((NGINX, conns))
            if rps and minimal and nginx:
                cells.append(f"{name} {rps / minimal:.2f}/{rps / nginx:.2f}")
        print(f"  {conns}c: " + "  ".join(cells))


def smoke_verdict(results: Results) -> int:
    ratio = results.throughput_ratio.get(16)
    if ratio is None:
        print("smoke: no meshgate/nginx ratio was measured (--nginx-only?)")
        return 0
    bad = sum(s.non_2xx for s in results.summary if s.target == MESHGATE)
    verdict = f"meshgate reached {ratio:.2f} x nginx throughput at 16 connections (floor {SMOKE_MIN_RATIO})"
    if bad or ratio < SMOKE_MIN_RATIO:
        reason = f"meshgate answered {bad} non-2xx responses under load" if bad else verdict
        print(f"smoke FAILED: {reason}", file=sys.stderr)
        return 1
    print(f"smoke ok: {verdict}")
    return 0


def write_json(path: Path, settings: Settings, cores: Cores, results: Results) -> None:
    document = {
        "settings": {**dataclasses.asdict(settings), "json_path": str(path), "proxy_core": cores.proxy},
        "machine": {"uname": " ".join(os.uname()), "cpus": sorted(os.sched_getaffinity(0)), "python": sys.version},
        **dataclasses.asdict(results),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    cores = pick_cores()
    try:
        results = run(settings, cores)
    except (BenchError, OSError, subprocess.SubprocessError, http.client.HTTPException) as exc:
        # One boundary for everything that stops a run: missing tools, a wrk timeout, a target gone mid-run.
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every process the bench started was stopped", file=sys.stderr)
        return 130
    report(results)
    if settings.json_path:
        write_json(settings.json_path, settings, cores, results)
    return smoke_verdict(results) if settings.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
