"""What `meshgate demo` runs besides the dashboard and the gateways: a small shop and the traffic that keeps it busy.

- `shop`: the four services (storefront, catalog, inventory, payments) as small Starlette apps, one process each.
  Storefront calls catalog and payments, catalog calls inventory, always through its own group's gateway (the
  outbound listener, routed by `Host`). Catalog runs twice: v1, and a v2 canary that is slower and answers every
  33rd request with a 503.
- `otel`: the services' OpenTelemetry SDK set-up: a server span per request (its parent from the incoming W3C
  `traceparent`), a client span per call with `traceparent` injected, spans batched to the dashboard's OTLP/HTTP
  receiver.
- `traffic`: an open-loop load generator calling the shop gateway's edge listener at a steady rate.
- `processes`: the child processes `meshgate.demo` starts, each in its own process group, stopped together.

Data flow: traffic -> shop gateway (edge) -> storefront -> shop gateway (outbound) -> mTLS -> catalog gateway
(inbound; 90/10 split) -> catalog v1|v2 -> catalog gateway (outbound) -> inventory gateway -> inventory; and
storefront -> shop gateway -> payments gateway -> payments. Every gateway and service exports its spans to the
dashboard, so one `x-request-id` finds the whole trace.
"""
