"""Two dashboard replicas sharing one real etcd (and one mesh CA): gateways watching one replica follow changes
made through the other, and either replica lists every gateway."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import StartUpstream, wait_for
from tests.e2e.mesh import Dashboard, joined_gateway, wait_ready
from tests.etcd import EtcdServer


def test_a_change_through_one_replica_reaches_gateways_watching_the_other(
    tmp_path: Path, etcd: EtcdServer, start_upstream: StartUpstream
) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    mesh_file = tmp_path / "mesh.yaml"
    catalog = {
        "subsets": {"v1": {"endpoints": [v1.address]}, "v2": {"endpoints": [v2.address]}},
        "routes": [{"name": "default", "split": {"v1": 100}}],
    }
    mesh_file.write_text(
        yaml.safe_dump({"groups": {"shop": [], "catalog": ["catalog"]}, "services": {"catalog": catalog}})
    )
    first = Dashboard(tmp_path / "a", "--store", etcd.url, "--config", str(mesh_file))
    shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")  # replicas share the operator's CA files
    second = Dashboard(tmp_path / "b", "--store", etcd.url)
    gateways = [joined_gateway(second, tmp_path, group) for group in ("shop", "catalog")]
    try:
        wait_ready(*gateways)
        shop = gateways[0].url("outbound") + "/echo"

        def upstream() -> str:
            return str(httpx.get(shop, headers={"host": "catalog"}, timeout=5).headers.get("x-upstream"))

        wait_for(lambda: upstream() == "v1", 15, what="shop reaches catalog through the mesh")
        with first.api(first.operator_token) as api:
            changed = api.put("/services/catalog/weights", json={"weights": {"v2": 100}, "reason": "via replica a"})
            assert changed.status_code == 200, changed.text
            started = time.monotonic()
            wait_for(lambda: upstream() == "v2", 1.0, 0.01, "the change through replica a on gateways of replica b")
            assert time.monotonic() - started < 1.0
            # Heartbeats went to replica b; replica a lists those gateways from etcd, in sync. Only catalog's view
            # changed (shop's view of catalog is its gateways, not its weights), so only it applied the new version.
            version = changed.json()["version"]

            def in_sync() -> dict[str, object] | None:
                listed = {g["group"]: g for g in api.get("/gateways").json() if g["in_sync"]}
                return listed if len(listed) == 2 and listed["catalog"]["config_version"] == version else None

            assert sorted(wait_for(in_sync, 10, what="both gateways listed in sync by replica a")) == [
                "catalog",
                "shop",
            ]
            history = api.get("/config/history").json()
        assert history[0]["reason"] == "via replica a" and history[0]["version"] == version, history
    finally:
        for gateway in gateways:
            gateway.stop()
        second.stop()
        first.stop()
