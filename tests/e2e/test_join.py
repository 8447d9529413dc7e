"""Joining a mesh: the dashboard over HTTPS pinned by CA hash or by the CA's root file (with the join token from a
file, as Kubernetes Secrets and compose volumes hand them over), refusals that say why, and readiness."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from dashboard.identity import MeshCA
from tests.conftest import ROOT, Gateway, listeners, wait_for
from tests.e2e.mesh import Dashboard, joined_gateway, ready, wait_ready


@pytest.fixture
def https_dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    dashboard = Dashboard(tmp_path / "dashboard", "--tls")
    yield dashboard
    dashboard.stop()


def ca_hash(dashboard: Dashboard) -> str:
    return MeshCA.load_or_create(str(dashboard.data / "ca"), "meshgate.local").ca_hash


def test_a_gateway_joins_an_https_dashboard_pinned_by_ca_hash(https_dashboard: Dashboard, tmp_path: Path) -> None:
    assert https_dashboard.url.startswith("https://")
    gateway = joined_gateway(https_dashboard, tmp_path, "shop", args=("--ca-hash", ca_hash(https_dashboard)))
    try:
        wait_ready(gateway)
        with https_dashboard.api() as api:
            listed = wait_for(lambda: api.get("/gateways").json(), 10, what="the gateway listed")
            assert [entry["group"] for entry in listed] == ["shop"]
            # Sampled spans go to the dashboard over HTTPS, checked against the mesh CA the gateway pinned.
            sampled = {"host": "nowhere", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
            answer = httpx.get(gateway.url("outbound") + "/", headers=sampled, timeout=5)
            request_id = answer.headers["x-request-id"]

            def stored() -> bool:
                found = api.get("/traces", params={"request_id": request_id})
                return found.status_code == 200 and any("store" in span["found_in"] for span in found.json()["spans"])

            wait_for(stored, 10, what="the gateway's span in the dashboard's store")
    finally:
        gateway.stop()


def meshgate(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_gateway_joins_with_its_token_and_ca_from_files(https_dashboard: Dashboard, tmp_path: Path) -> None:
    """What the compose bootstrap does: `dashboard ca --out` and `token create --out`, then `--token-file --ca`."""
    data = str(https_dashboard.data)
    ca_file, token_file = tmp_path / "ca.pem", tmp_path / "shop.token"
    shown = meshgate("dashboard", "ca", "--data", data, "--out", str(ca_file)).strip()
    assert shown == ca_hash(https_dashboard)
    meshgate(
        "dashboard", "token", "create", "--data", data, "--role", "gateway", "--group", "shop", "--out", str(token_file)
    )
    config = tmp_path / "gateway-shop.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"listen": listeners("metrics"), "telemetry": {"access_log": "off"}}}))
    args = ["--control", https_dashboard.url, "--group", "shop", "--token-file", str(token_file), "--ca", str(ca_file)]
    args += ["--data", str(tmp_path / "data"), "--advertise", "gw-shop.example:15006"]
    gateway = Gateway(config, args)
    try:
        wait_ready(gateway)
        probe = httpx.get(gateway.url("metrics") + "/ready", timeout=5)  # what kubelet and compose probe
        assert (probe.status_code, probe.text) == (200, "ready\n")
        with https_dashboard.api() as api:
            listed = wait_for(lambda: api.get("/gateways").json(), 10, what="the gateway listed")
        assert [(entry["group"], entry["advertise"]) for entry in listed] == [("shop", "gw-shop.example:15006")]
    finally:
        gateway.stop()


def test_a_ca_file_of_another_mesh_is_refused_like_a_wrong_hash(https_dashboard: Dashboard, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    meshgate("dashboard", "ca", "--data", str(tmp_path / "other-mesh"), "--out", str(other))
    gateway = joined_gateway(https_dashboard, tmp_path, "shop", "metrics", args=("--ca", str(other)))
    try:
        gateway.wait_log("but the pinned CA (--ca-hash or --ca) is sha256:")  # the same pinning path as --ca-hash
        assert not ready(gateway)
        assert httpx.get(gateway.url("metrics") + "/ready", timeout=5).status_code == 503
        with https_dashboard.api() as api:
            assert api.get("/gateways").json() == []
    finally:
        gateway.stop()


def test_a_wrong_ca_hash_is_refused_and_said(https_dashboard: Dashboard, tmp_path: Path) -> None:
    wrong = "sha256:" + "0" * 64
    gateway = joined_gateway(https_dashboard, tmp_path, "shop", args=("--ca-hash", wrong))
    try:
        gateway.wait_log(f"but the pinned CA (--ca-hash or --ca) is {wrong}")
        assert not ready(gateway)
        with https_dashboard.api() as api:
            assert api.get("/gateways").json() == []  # it never sent its token to an unpinned server
    finally:
        gateway.stop()


def test_a_refused_join_token_keeps_the_gateway_unready_with_the_reason(tmp_path: Path) -> None:
    dashboard = Dashboard(tmp_path / "dashboard")
    config = tmp_path / "gw.yaml"
    config.write_text("gateway: {listen: {inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0}}\n")
    args = ["--control", dashboard.url, "--group", "shop", "--token", "mgj_not-a-token", "--data", str(tmp_path / "d")]
    gateway = Gateway(config, args)
    try:
        gateway.wait_log("refused the join token")
        assert not ready(gateway)
    finally:
        gateway.stop()
        dashboard.stop()


def test_a_gateway_that_never_got_a_config_is_not_ready_until_the_dashboard_comes(tmp_path: Path) -> None:
    dashboard = Dashboard(tmp_path / "dashboard")
    gateway = joined_gateway(dashboard, tmp_path, "shop")
    wait_ready(gateway)
    gateway.stop()  # it joined and cached; start afresh with neither, and the dashboard down
    dashboard.kill()
    for name in ("config.json", "cert.pem"):
        (tmp_path / "gateway-shop-data" / name).unlink()
    restarted = Gateway(gateway.config_path, [str(arg) for arg in gateway.proc.args[6:]])  # type: ignore[index]
    try:
        answer = httpx.get(restarted.url("admin") + "/ready", timeout=5)
        assert answer.status_code == 503
        for _ in range(3):  # requests get a clear 503, not a hang
            answer = httpx.get(restarted.url("outbound") + "/", headers={"host": "shop"}, timeout=5)
            assert answer.status_code == 503 and "no configuration" in answer.text
        dashboard.restart()
        back = time.monotonic()
        wait_ready(restarted)
        # A young outage is probed every 0.5 s: joined and synced within about a second of the dashboard listening.
        assert time.monotonic() - back < 1.5, restarted.output()
        assert "joining the mesh failed" in restarted.output() and restarted.output().count("retrying about") == 2
    finally:
        restarted.stop()
        dashboard.stop()


@pytest.mark.parametrize(
    ("url", "extra", "reason"),
    [
        ("http://10.1.2.3:9000", [], "must be reached over https"),
        ("https://10.1.2.3:9000", [], "pin the mesh CA with --ca FILE or --ca-hash"),
        ("ftp://127.0.0.1:9000", [], "expected an http(s) URL"),
    ],
)
def test_the_command_line_refuses_plaintext_or_unpinned_control_beyond_loopback(
    url: str, extra: list[str], reason: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", "gateway", "--control", url, "--group", "shop", "--token", "t", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert reason in done.stderr and "Traceback" not in done.stderr


def test_a_dashboard_on_every_interface_is_verified_at_the_address_peers_dial(tmp_path: Path) -> None:
    """Listening on 0.0.0.0, the HTTPS certificate also names the address this host sends from, which other
    hosts dial, even where the host name maps to loopback only (as here, and as Debian's 127.0.1.1 does)."""
    from dashboard.serve import _routed_addresses

    routed = sorted(address for address in _routed_addresses() if "." in address)
    if not routed:
        pytest.skip("this machine has no IPv4 route, so no address other hosts would dial")
    dashboard = Dashboard(tmp_path / "dashboard", "--listen", "0.0.0.0:0")
    try:
        port = dashboard.url.rsplit(":", 1)[1]
        mesh_ca = ssl.create_default_context(cafile=str(dashboard.data / "ca" / "root.pem"))
        answer = httpx.get(f"https://{routed[0]}:{port}/healthz", verify=mesh_ca, timeout=5)
        assert (answer.status_code, answer.text) == (200, "ok\n")
    finally:
        dashboard.stop()
