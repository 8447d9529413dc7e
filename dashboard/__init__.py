"""meshgate's control server (`meshgate dashboard`) and the operator command line.

- `mesh`: the mesh document (groups and the services each owns), validated with the gateway's own config rules.
- `store`, `etcd`: versioned config with history and audit, tokens and gateway heartbeats, in SQLite or etcd v3;
  `datadir`: the data directory and its files kept private (0700 and 0600).
- `identity`: the mesh CA; gateways send CSRs and get SPIFFE X.509-SVIDs.
- `app`, `api`, `wire`, `heartbeats`, `auth`, `attempts`, `bodies`, `errors`, `openapi`, `metrics`: the Starlette
  app: the operator API, the gateway protocol (join, sync, heartbeat) and what a heartbeat may carry, bearer tokens
  and the limit on failed ones, body limits, JSON errors, OpenAPI, /metrics.
- `otlp`, `spans`, `jaeger`, `traces`: the OTLP receiver, the span store, Jaeger's query API, and trace lookup by
  request or trace ID (stored spans merged with the gateways' rings).
- `stats`, `prometheus`, `topology`, `signals`: golden signals over time (embedded history or Prometheus), the
  topology and its layout, and their API.
- `views`, `pagedata`, `charts`, `sessions`, `headers`, `templates/`: the pages (Jinja2 + htmx), login sessions
  with CSRF, and security headers.
- `serve`, `client`, `cli`: `meshgate dashboard`, `meshgate apply` / `get`, and the `meshgate` entry point.
- `demo`, `demoapps`: `meshgate demo`, a whole mesh of shop services on loopback with live traffic.
"""
