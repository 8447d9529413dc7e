"""meshgate's data plane: the gateway, an HTTP/1.1 reverse proxy at the edge of each service group.

Pieces and how a request flows through them:
- `config`: the YAML model, parsed once into frozen dataclasses (`Config.load`).
- `routing`: an immutable `RouteTable` snapshot built from a config: authority -> service -> route -> subset.
- `balancer`: endpoint state (latency, ejection, health) and the picking policies.
- `proxy`: the client side of each connection and the per-request `Exchange` (the hot path).
- `upstream`: keep-alive pools and the response side.
- `server`: listeners, the per-process `Runtime`, reload and drain; `supervisor` runs N worker processes.
- `admin`, `health`, `errors`: admin endpoints, active health checks, and failures mapped to responses.
- `control`, `tls`: joining a mesh (identity, config watch, heartbeats) and the mesh's mTLS contexts.
- `cli`: `meshgate gateway`.
"""
