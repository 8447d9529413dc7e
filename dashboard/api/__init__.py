"""The dashboard's HTTP APIs: for operators, for gateways, for the pages' data, and their common parts.

- `operator`: the mesh document, its history and audit, canary weights (`/api/v1/mesh`, `/services/...`).
- `gateways`: what gateways call: join (a CSR for a certificate), sync (long-poll for config), heartbeat.
- `heartbeats`: what a heartbeat may carry, and how it is checked and stored.
- `signals`: golden signals and the topology (`/api/v1/signals`, `/api/v1/topology`).
- `traces`: trace lookup by request or trace ID, and the OTLP span intake (`/v1/traces`).
- `auth`, `bodies`, `selfmetrics`, `openapi`: bearer tokens and roles, request bodies and their limits, the
  dashboard's own /metrics, and the OpenAPI document.
"""
