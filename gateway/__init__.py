"""meshgate's data plane: the gateway, an HTTP/1.1 reverse proxy at the edge of each service group.

Bottom to top (docs/architecture.md; pyproject.toml [tool.importlinter] enforces it, type-only imports included):
- `units`, `propagation`: config values (addresses, durations, sizes), small shared helpers; trace context headers
  and request IDs.
- `config`, `errors`, `hops`, `http1`, `telemetry`, `deadlines`, `tls`, `etcd`: the YAML model (`Config.load`),
  failures mapped to responses, hop records and their ring, HTTP/1.1 framing rules both sides share, the golden
  signals, the timer wheel, the mesh's mTLS contexts, a small etcd v3 client.
- `upstream`, `balancer`, `routing`: keep-alive pools and upstream connections; endpoints and picking policies; the
  immutable `RouteTable` (authority -> service -> route -> subset).
- `health`, `accesslog`, `exporter`: active health checks, the access log, OTLP span export.
- `runtime`: the state one serving process keeps (`Runtime`, `AdminState`, `Peers`).
- `exchange`, `admin`: one request through the mesh (the hot path); the admin endpoints.
- `proxy`: one client connection: parsing, pipelining, timeouts, back-pressure.
- `sources`, `control`, `discovery`: where config comes from: a file, the control server; endpoints from DNS/etcd.
- `server`, `supervisor`, `cli`, `register`: one process, N workers, `meshgate gateway`, `meshgate register`.

A lower layer talks upward only through Protocols or callables it defines (`runtime.Connection`,
`upstream.ResponseSink`, `exchange.Downstream`).
"""
