"""Golden signals over time: what the topology, the service pages and `/api/v1/signals` show.

- `history`: the embedded history of the gateways' heartbeats (rates, errors, latency histograms, saturation),
  and the `Signals` protocol both sources answer.
- `prometheus`: the same answers read from Prometheus (`--prometheus URL`).
- `topology`: the service graph built from the mesh, the traffic and the heartbeats, and its layout.

Their HTTP API is `dashboard.api.signals`.
"""
