"""`kvgate serve` as a real process, driven by the official `openai` client: streaming chat,
completions, cached tokens on a repeated prefix, errors; then a graceful shutdown (SIGTERM)
and a second process on the same disk directory that serves the prefix from the disk tier."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests.conftest import child_env

SYSTEM = {"role": "system", "content": "You answer questions about the kvgate manual. " * 6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tmp_path, port: int, *settings: str, **popen) -> subprocess.Popen:
    """`kvgate serve` on the demo model with a disk tier under tmp_path; `settings` are more
    `--set` overrides (the last one of a key wins)."""
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning",
           "--set", 'model.device="cpu"', "--set", 'model.path="builtin:tiny"', "--set", "store.gpu.num_blocks=256",
           "--set", "store.host.num_blocks=64",
           "--set", f"store.disk.path={tmp_path / 'kv'}", "--set", "store.disk.max_bytes=100000000"]
    for s in settings:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:          # poll until it answers (model load, LMDB open)
        if proc.poll() is not None:
            pytest.fail(f"kvgate serve exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("kvgate serve did not become healthy")


def stop(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM to the server, or to its whole process group (`group`: as systemd and `timeout`
    stop a service; the server must have been started with start_new_session=True)."""
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stdout.read()


def ask(client, question: str):
    return client.chat.completions.create(model="builtin:tiny", max_tokens=12, temperature=0,
                                          messages=[SYSTEM, {"role": "user", "content": question}])


def test_openai_client_against_kvgate_serve_and_a_restart(tmp_path):
    port = free_port()
    proc = serve(tmp_path, port, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["builtin:tiny"]
        assert client.models.retrieve("builtin:tiny").id == "builtin:tiny"      # /v1/models/{id}
        biased = client.completions.create(model="builtin:tiny", prompt="Hi", max_tokens=4, temperature=0,
                                           logit_bias={"70": 100}, presence_penalty=0.5,
                                           extra_body={"min_tokens": 2, "repetition_penalty": 1.2})
        assert biased.choices[0].text == "gggg"       # token 70 of the demo's byte-level alphabet, 4 times

        chunks = list(client.chat.completions.create(
            model="builtin:tiny", messages=[{"role": "user", "content": "Stream, please."}], max_tokens=16,
            temperature=0, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 16 and text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

        done = client.completions.create(model="builtin:tiny", prompt="Once upon a time", max_tokens=8,
                                         temperature=0)
        assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"

        check_logprobs_and_echo(client)

        first = ask(client, "What is a block?")
        second = ask(client, "What is a tier?")
        stored = client.responses.create(model="builtin:tiny", instructions=SYSTEM["content"], temperature=0,
                                         input="Remember this conversation.", max_output_tokens=8)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens >= 16 * 12   # the system prompt
        assert second.usage.prompt_tokens_details.cached_tokens_by_tier["gpu"] > 0

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "x"}],
                                           temperature=5)
        assert e.value.body["param"] == "temperature"
    finally:     # graceful, even with every process of the group signalled: cached blocks go to disk
        stop(proc, group=True)

    proc = serve(tmp_path, port)                 # a new process on the same disk directory
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        again = ask(client, "What is a block?")
        assert again.usage.prompt_tokens_details.cached_tokens_by_tier["disk"] >= 16 * 12
        assert again.choices[0].message.content == first.choices[0].message.content
        # a stored response continued after the restart: its conversation from the store, its blocks from disk
        continued = client.responses.create(model="builtin:tiny", instructions=SYSTEM["content"], temperature=0,
                                            previous_response_id=stored.id, input="Go on.", max_output_tokens=4)
        assert continued.usage.input_tokens > stored.usage.input_tokens + 8
        details = continued.usage.input_tokens_details          # the system prompt is on the GPU again (`again`)
        assert details.cached_tokens >= stored.usage.input_tokens // 16 * 16 - 16
        assert details.cached_tokens_by_tier["disk"] > 0
    finally:
        stop(proc)


def check_logprobs_and_echo(client) -> None:
    """Logprobs in OpenAI's shapes through the official client, streamed and not; echo."""
    question = [{"role": "user", "content": "Score me."}]
    scored = client.chat.completions.create(model="builtin:tiny", messages=question, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = scored.choices[0].logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 3 for e in content)
    for e in content:      # greedy: the token taken is the likeliest, and the three come in order
        assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.logprob <= 0 and [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True)
    assert b"".join(bytes(e.bytes) for e in content).decode() == scored.choices[0].message.content
    chunks = list(client.chat.completions.create(model="builtin:tiny", messages=question, max_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = client.chat.completions.create(model="builtin:tiny", messages=question, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None

    done = client.completions.create(model="builtin:tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                     logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    echoed = client.completions.create(model="builtin:tiny", prompt="Once upon a time", max_tokens=5,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + done.choices[0].text
    for bad, param in (({"echo": True, "logprobs": 1}, "echo"), ({"logprobs": 21}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="builtin:tiny", prompt="x", max_tokens=2, **bad)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="builtin:tiny", messages=question, max_tokens=2, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
