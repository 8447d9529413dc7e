"""meshgate, the product: the `meshgate` command and what spans the gateway and the dashboard.

- `cli`: the `meshgate` entry point; it parses every subcommand and hands each to its package
  (`gateway`, `dashboard`, `register`, `apply`/`get`, `demo`).
- `client`: the operator's client for the dashboard's API (`meshgate apply`, `meshgate get`).
- `demo`, `demoapps/`: `meshgate demo`, a whole mesh of shop services on loopback with live traffic.

Layers: `meshgate` sits on top of `dashboard` and `gateway`; neither imports it (docs/architecture.md).
"""
