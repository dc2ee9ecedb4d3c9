"""`kvgate bench` against a real HTTP server on the demo model, at a small scale."""
import argparse
import asyncio
import json

import pytest

from gateway.bench import client as bench
from gateway.app import init_app
from gateway.config import build_config


async def test_bench_runs_every_workload_over_http(aiohttp_server, engine_processes, tmp_path, capsys):
    config = build_config({"model": {"path": "builtin:tiny", "device": "cpu"}, "store": {"gpu": {"num_blocks": 512},
                           "host": {"num_blocks": 256}, "disk": {"enabled": False}}})
    server = await aiohttp_server(init_app(config, engine_process=await engine_processes.get(config)))
    args = argparse.Namespace(base_url=f"http://127.0.0.1:{server.port}/v1", model="", api_key=None,
                              workloads="gsp,unique,decode1,chat,chat-think,chat-think-long", scale=0.125,
                              length_scale=0.06,
                              vocab=0, json=str(tmp_path / "out.json"), plots=None, think_s=0.002)
    rows = {r["workload"]: r for r in await bench.main_async(args)}
    assert set(rows) == {"gsp", "unique", "decode1", "chat", "chat-think", "chat-think-long"}
    assert rows["gsp"]["requests"] == 16 and rows["gsp"]["out_tokens"] == 16 * 8
    assert rows["gsp"]["cached_fraction"]["gpu"] > 0.5          # the group prefix, computed once
    assert rows["unique"]["cached_fraction"]["gpu"] == 0
    rounds = rows["chat"]["rounds"]
    assert len(rounds) == 8 and rounds[0]["cached_fraction"] == 0
    assert all(r["cached_fraction"] > 0.5 for r in rounds[1:])   # each turn hits the history
    think = rows["chat-think"]                                  # 8 users, 8 rounds, thinking between
    assert think["requests"] == 64 and len(think["rounds"]) == 8
    assert think["ttft_later_p90_s"] >= think["ttft_later_p50_s"] > 0
    assert all(r["cached_fraction"] > 0.5 for r in think["rounds"][1:])
    long = rows["chat-think-long"]                              # 3 users, 4 rounds of long histories
    assert long["requests"] == 12 and len(long["rounds"]) == 4 and long["ttft_later_p50_s"] > 0
    assert all(r["cached_fraction"] > 0.8 for r in long["rounds"][1:])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["model"] == "builtin:tiny" and len(saved["samples"]) == 16 + 8 + 1 + 2 * 8 + 64 + 12
    assert "out tok/s" in capsys.readouterr().out


async def test_bench_serving_runs_the_same_workload_in_process_and_over_a_served_process(tmp_path, capsys):
    """`python -m gateway.bench.serving`: the workload code is kvgate bench's on both paths, so
    both see the same requests; the served one is a real `kvgate serve` subprocess."""
    from gateway.bench import serving as bench_serving
    settings = ["store.gpu.num_blocks=256", "store.host.enabled=false", "store.disk.enabled=false"]
    args = argparse.Namespace(workloads="gsp", scale=0.125, length_scale=0.06, overrides=settings, port=0,
                              json=str(tmp_path / "serving.json"))
    args.port = _free_port()
    (row,) = await bench_serving.main_async(args)
    local, http = row["in_process"], row["http"]
    for x in (local, http):
        assert x["requests"] == 16 and x["out_tokens"] == 16 * 8
        assert x["cached_fraction"]["gpu"] > 0.5               # the group prefix, computed once
    # the same prompts on the same engine settings (requests over HTTP arrive spread out)
    assert local["cached_fraction"]["gpu"] == pytest.approx(http["cached_fraction"]["gpu"], abs=0.02)
    # both processes of the server did work during the run: the engine the forward passes
    assert set(http["cores"]) == {"api", "engine"} and http["cores"]["engine"] > 0
    assert "http ÷ in" in capsys.readouterr().out
    assert json.loads((tmp_path / "serving.json").read_text())["settings"] == settings


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_bench_client_holds_no_request_back(aiohttp_server):
    """gsp sends 128 requests at once; a client capped below that measures its own queue."""
    from aiohttp import web

    from gateway.bench.client import session_for_workloads
    inside, peak, release = [0], [0], asyncio.Event()

    async def handler(request):
        inside[0] += 1
        peak[0] = max(peak[0], inside[0])
        if peak[0] == 150:
            release.set()
        await release.wait()
        inside[0] -= 1
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_get("/", handler)
    server = await aiohttp_server(app)
    async with session_for_workloads() as session:
        async def one():
            async with session.get(server.make_url("/")) as resp:
                assert resp.status == 200
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(150))), 30)
    assert peak[0] == 150


async def test_plots_without_matplotlib_are_refused_before_any_request(monkeypatch, capsys):
    import importlib.util

    from gateway.bench import client as bench
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    args = argparse.Namespace(base_url="http://127.0.0.1:9/v1", model="", api_key=None, workloads="gsp", scale=1,
                              length_scale=1, vocab=0, json=None, plots="plots", think_s=0)
    with pytest.raises(SystemExit) as e:       # port 9 has no server: it never got that far
        await bench.main_async(args)
    assert e.value.code == 2 and "--plots needs matplotlib" in capsys.readouterr().err


def test_plots_carry_the_run_details_and_start_at_0(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from gateway.bench import client as bench
    seen, real_save = [], Figure.savefig

    def savefig(fig, path, *a, **kw):
        seen.append([(ax.get_title(), ax.get_ylim()) for ax in fig.axes])
        return real_save(fig, path, *a, **kw)
    monkeypatch.setattr(Figure, "savefig", savefig)
    rows = [{"workload": "gsp", "out_tok_s": 100.0},
            {"workload": "chat", "out_tok_s": 50.0, "rounds": [{"round": 1, "ttft_p50_s": 0.05, "cached_fraction": 0.0},
                                                             {"round": 2, "ttft_p50_s": 0.01, "cached_fraction": 0.9}]}]
    paths = bench.plot(rows, str(tmp_path), "builtin:tiny, scale 1, 2026-12-02")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["throughput.png", "chat_ttft.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 0 for p in paths)
    throughput, chat = seen
    assert throughput[0][0].endswith("builtin:tiny, scale 1, 2026-12-02") and throughput[0][1][0] == 0
    assert chat[0][1][0] == 0 and chat[1][1] == (0, 100)      # TTFT from 0; cache hits 0-100 %


def test_bench_against_no_server_is_one_line(capsys):
    from gateway.cli import main
    assert main(["bench", "--base-url", "http://127.0.0.1:9/v1", "--workloads", "gsp"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvgate bench: http://127.0.0.1:9/v1: ") and "Traceback" not in err[0]
