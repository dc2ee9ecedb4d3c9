"""Benchmarks over HTTP, run from the API side: `kvgate bench` (client.py, any OpenAI-compatible
server), a served engine against the same engine in process (serving.py), tenants' fairness
(tenants.py), replicas behind the prefix router (replicas.py), and the router replayed on
traces without a model (route_sim.py)."""

# The model the benches serve unless a `--set model.path=...` says another: the random-weight
# demo, which docs/benchmarks.md's CPU figures use (kvgate's own default is a real model)
BENCH_MODEL = "model.path=builtin:tiny"


def add_arguments(p) -> None:
    """`kvgate bench`'s arguments (here, not in client.py: `kvgate --help` imports nothing heavy)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="", help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--workloads", default="gsp,unique,decode1,chat")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the number of requests / users")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiplies every prompt and output length")
    p.add_argument("--vocab", type=int, default=0,
                   help="token ids are drawn below this (default: from /v1/models)")
    p.add_argument("--think-s", type=float, default=None,
                   help="chat-think: mean think time between turns (default 5 s; chat-think-long 6 s)")
    p.add_argument("--json", default=None, help="write the summary and every request to this file")
    p.add_argument("--plots", default=None, help="write PNG plots to this directory (needs matplotlib)")
