"""Benchmarks over HTTP, run from the API side: `kvgate bench` (client.py, any OpenAI-compatible
server), a served engine against the same engine in process (serving.py), tenants' fairness
(tenants.py), replicas behind the prefix router (replicas.py), and the router replayed on
traces without a model (route_sim.py)."""
