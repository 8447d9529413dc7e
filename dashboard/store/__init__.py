"""Where the dashboard keeps its state (the `Store` protocol in `model`), in SQLite or etcd v3.

- `model`: the `Store` protocol, its records (`Revision`, `AuditEntry`, `TokenRecord`, `GatewayRecord`,
  `RolloutRecord` and a rollout's log entries), errors, and the helpers both backends share.
- `sqlite`: `SQLiteStore`, one file in the data directory, for a single dashboard.
- `etcd`: `EtcdStore`, several dashboard replicas sharing one etcd cluster.
"""

from __future__ import annotations

from dashboard.store.etcd import EtcdStore
from dashboard.store.model import Store
from dashboard.store.sqlite import SQLiteStore


def open_store(url_or_dir: str) -> Store:
    """`etcd://host:port[,host:port]` or a data directory (created 0700 if missing) holding `mesh.db`."""
    if url_or_dir.startswith("etcd://"):
        return EtcdStore.from_url(url_or_dir)
    return SQLiteStore.open(url_or_dir)
