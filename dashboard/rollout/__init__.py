"""Automated canary rollouts: a service's canary stepped up by itself while it is no worse than the primary.

- `judge`: the sequential test (no clock, no I/O), decision 0006;
- `signals`: the owner gateways' heartbeats as per-interval strata for the judge;
- `spec`: what a rollout is asked to do, and its stored state;
- `driver`: `Rollouts`, the loop one dashboard replica runs (a store lease), its decisions, the API's actions, replay;
- `webhooks`: the gate and the events, signed and kept off internal addresses.
"""
