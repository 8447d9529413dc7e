from __future__ import annotations

import json

import httpx

from tests.conftest import gateway_config


def test_proxies_with_request_id(start_gateway, start_upstream):
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config({"hello": {"subsets": {"v1": {"endpoints": [upstream.address]}}}}))
    with httpx.Client(base_url=gw.url(), trust_env=False) as client:
        for _ in range(3):
            response = client.get("/echo/x?y=1", headers={"host": "hello"})
            assert response.status_code == 200
            echo = response.json()
            assert echo["path"] == "/echo/x?y=1"
            assert echo["headers"]["x-request-id"] == [response.headers["x-request-id"]]
    assert upstream.connections == 1  # keep-alive on both sides
    assert json.loads(httpx.get(gw.url("admin") + "/config", trust_env=False).text)["version"] == 1
