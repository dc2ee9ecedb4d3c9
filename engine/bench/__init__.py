"""In-process engine benchmark: the workloads of BENCHMARKS.md through kvgate's engine and
through transformers on the same weights, in the same run.

    python -m engine.bench                                   # tiny model on the CPU
    python -m engine.bench --model dummy:llama3-8b --gpu-blocks 20000 --peer-script PATH/hf_peer.py
    python -m engine.bench --model dummy:llama3-8b --workloads chat,chat-overflow,restart

Workloads (token ids drawn from a seeded generator, greedy, output length forced):
  gsp      G groups x 16 requests: a 2048-token group prefix + 128 unique tokens; 128 out
  unique   64 prompts of 2176 random tokens; 128 out
  decode1  one 2048-token prompt; 128 out
  chat, chat-overflow, restart, chat-think, chat-think-long: see engine/bench/tiers.py
--scale multiplies the number of requests (G = max(1, round(8 * scale)) on GPU, 1 on CPU; chat
users 16 x scale, chat-overflow users 32 x scale, chat-think users 64 x scale). kvgate runs each
workload on a fresh engine (cold cache). The peer: transformers' continuous batching
(`generate_batch`) for gsp and unique, and plain `generate` for decode1, in this process on the
same weights, or with --peer-script the shared hf_peer.py in its own process before kvgate's
runs (the side-by-side table of a device run).
"""
