"""meshgate's control server (`meshgate dashboard`): the mesh's config, identities, telemetry and pages.

Bottom to top (docs/architecture.md; pyproject.toml [tool.importlinter] enforces it):
- `errors`, `datadir`, `mesh`, `attempts`, `headers`: JSON errors, the private data directory, the mesh document
  (validated with the gateway's own config rules), the limit on failed logins and tokens, security headers.
- `store/`: versioned config with history and audit, tokens and gateway heartbeats, in SQLite or etcd v3.
- `identity`: the mesh CA; gateways send CSRs and get SPIFFE X.509-SVIDs.
- `signals/`: golden signals over time (embedded history or Prometheus), the topology, and their API.
- `spans/`: the OTLP receiver, the span store, Jaeger's query API, and trace lookup.
- `settings`: what one running dashboard was started with, shared by the layers above.
- `api/`: the operator API, the API the gateways call (join, sync, heartbeat), golden signals and traces over
  HTTP, bearer tokens and roles, body limits, the dashboard's own /metrics, and the OpenAPI document.
- `ui/`: the pages (Jinja2 + htmx), login sessions with CSRF.
- `app`, `guard`, `serve`: the Starlette app, the HTTP/1.1 protocol with the gateway's limits, and the process.

The command line, the operator client and the demo are in the top-level `meshgate` package.
"""
