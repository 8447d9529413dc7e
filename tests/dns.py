"""A real DNS server (Debian's dnsmasq, /usr/sbin/dnsmasq) on a free loopback port, for the discovery tests.
`tests/conftest.py` exposes the `dns_server` fixture to every test.

A and AAAA records come from a hosts file (TTL 1 s) that `set_hosts` rewrites; dnsmasq rereads it on SIGHUP. SRV
records are dnsmasq flags (`--srv-host`), fixed for the life of the process, so a test that needs other SRV
records starts another server; their targets' addresses come from the hosts file and change like any name. Names
are under `.test` (RFC 2606), which dnsmasq answers from its own data only (`--local=/test/`): a name it does not
have is NXDOMAIN, and one without records of a type is an empty answer, as a real zone's would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.nameserver
import dns.resolver
import pytest

from tests.etcd import free_ports

DNSMASQ = "/usr/sbin/dnsmasq"
Hosts = Mapping[str, Sequence[str]]  # name -> IPv4 and IPv6 addresses


class DnsServer:
    """One dnsmasq. `address` is what `gateway.discovery.resolvers` takes; `stop()` and `start()` take it away and
    bring it back on the same port.

    >>> server = DnsServer(tmp_path, {"v1.shop.test": ["127.0.0.2"]}, srv=["_http._tcp.shop.test,v1.shop.test,8080,10"])
    """

    def __init__(self, directory: Path, hosts: Hosts, srv: Sequence[str] = ()) -> None:
        self.hosts_path = directory / "hosts"
        self.log_path = directory / "dnsmasq.log"
        self.srv = list(srv)
        self.hosts: dict[str, list[str]] = {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._write(hosts)
        for _ in range(3):  # a free port can be taken between choosing it and dnsmasq binding it
            (self.port,) = free_ports(1)
            if self.start():
                return
        raise AssertionError(f"dnsmasq did not start:\n{self.log()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> bool:
        """Start dnsmasq on `port`; True once it answers, False if it exited (the port was taken)."""
        args = [
            DNSMASQ,
            *("--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces", "--log-queries"),
            *(f"--port={self.port}", "--listen-address=127.0.0.1", "--user=root", "--pid-file="),
            *("--conf-file=/dev/null", f"--addn-hosts={self.hosts_path}", "--local-ttl=1", "--local=/test/"),
            f"--log-facility={self.log_path}",
            *(f"--srv-host={record}" for record in self.srv),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                self.resolve("ready.test", "A")
            except dns.resolver.NXDOMAIN:
                return True  # an answer: dnsmasq is serving
            except dns.exception.DNSException:
                time.sleep(0.02)  # not listening yet
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def set_hosts(self, hosts: Hosts) -> None:
        """Replace every A and AAAA record, and wait until dnsmasq answers with the new ones."""
        old = self.hosts
        self._write(hosts)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        for name in {*old, *hosts}:
            while self.addresses(name) != sorted(hosts.get(name, ())):
                assert time.monotonic() < deadline, f"dnsmasq still answers {self.addresses(name)} for {name}"
                time.sleep(0.02)

    def addresses(self, name: str) -> list[str]:
        """The name's A and AAAA addresses as dnsmasq answers them now (none for NXDOMAIN)."""
        try:
            return sorted(address for rdtype in ("A", "AAAA") for address in self.resolve(name, rdtype))
        except dns.resolver.NXDOMAIN:
            return []

    def resolve(self, name: str, rdtype: str) -> list[str]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port=self.port)]
        resolver.lifetime = 0.5
        answer = resolver.resolve(name, rdtype, raise_on_no_answer=False)
        return [record.to_text() for record in answer.rrset or ()]

    def queries(self, name: str) -> int:
        """How many queries for `name` dnsmasq has answered (it logs each one)."""
        return sum("query[" in line and f" {name} from " in line for line in self.log().splitlines())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _write(self, hosts: Hosts) -> None:
        self.hosts = {name: list(addresses) for name, addresses in hosts.items()}
        lines = [f"{address} {name}\n" for name, addresses in hosts.items() for address in addresses]
        temp = self.hosts_path.with_suffix(".tmp")
        temp.write_text("".join(lines))
        os.replace(temp, self.hosts_path)  # dnsmasq never reads half a file


StartDns = Callable[..., DnsServer]


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[StartDns]:
    """Start dnsmasq servers: `dns_server({"name.test": ["127.0.0.2", "::1"]}, srv=[...])`; all stop after the test."""
    if not os.access(DNSMASQ, os.X_OK):
        pytest.skip(f"{DNSMASQ} is not installed (apt-get install dnsmasq-base)")
    started: list[DnsServer] = []

    def start(hosts: Hosts, srv: Sequence[str] = ()) -> DnsServer:
        directory = tmp_path / f"dnsmasq-{len(started)}"
        directory.mkdir()
        started.append(DnsServer(directory, hosts, srv))
        return started[-1]

    yield start
    for server in started:
        server.stop()
