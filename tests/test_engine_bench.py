"""The in-process benchmark's tier workloads run end to end on the CPU (tiny shapes) and report
what they claim: 8 chat rounds, three overflow configurations, and a restart served from disk."""
from engine.bench import cli as bench


async def test_tier_workloads_report_rounds_configs_and_disk_hits(tmp_path):
    args = bench.build_parser().parse_args(
        ["--workloads", "chat,chat-overflow,restart", "--scale", "0.25", "--length", "0.05",
         "--no-peer", "--gpu-blocks", "256"])
    rows = await bench.main_async(args)
    chat = [r for r in rows if r["workload"] == "chat"]
    assert len(chat) == 1 and [x["round"] for x in chat[0]["rounds"]] == list(range(1, 9))
    assert chat[0]["rounds"][-1]["cached_fraction"]["gpu"] > 0.5      # the history is reused
    overflow = {r["config"]: r for r in rows if r["workload"] == "chat-overflow"}
    assert set(overflow) == {"gpu", "gpu+host", "gpu+host+disk", "gpu+host+disk, load"}
    assert overflow["gpu"]["cached_fraction"]["host"] == 0
    assert all(r["conversation_blocks"] >= 4 * r["gpu_blocks"] for r in overflow.values())
    assert overflow["gpu+host"]["cached_fraction"]["host"] > 0
    restart = {r["config"]: r for r in rows if r["workload"] == "restart"}
    assert restart["cold"]["cached_fraction"]["disk"] == 0
    assert restart["restarted, load"]["cached_fraction"]["disk"] > 0.8
    assert all(r["out_tokens"] == r["requests"] * 6 for r in restart.values())   # 128 x 0.05


async def test_chat_think_runs_each_tier_configuration_and_a_load_mode(capsys):
    args = bench.build_parser().parse_args(
        ["--workloads", "chat-think", "--scale", "0.0625", "--length", "0.05", "--think-s", "0.02",
         "--think-configs", "gpu,small-host+disk/load", "--no-peer"])
    rows = {r["config"]: r for r in await bench.main_async(args)}
    assert set(rows) == {"gpu", "small-host+disk/load"}
    gpu, disk = rows["gpu"], rows["small-host+disk/load"]
    assert [x["round"] for x in gpu["rounds"]] == list(range(1, 9)) and gpu["cached_fraction"]["disk"] == 0
    assert disk["host_blocks"] == disk["gpu_blocks"] // 2 and disk["disk_writes"] > 0
    assert disk["cached_fraction"]["disk"] > 0           # returning users read their history back
    assert set(disk["steps_by_run"]) == {"eager"} and {"admissions_blocked", "read_waits", "overload"} <= set(disk)
    bench.print_think_table(list(rows.values()))
    assert "small-host+disk/load" in capsys.readouterr().out


def test_profile_step_times_decode_and_mixed_steps(capsys):
    from engine.bench.cli import main
    main(["--profile-step", "--scale", "0.05", "--length", "0.1", "--profile-prefill", "24"])
    out = capsys.readouterr().out
    assert "decode steps of 2 sequences, median ms: schedule" in out
    # 20 profiled decode steps after one; the returning user hits every full block of its context
    assert "steps of 2 decoding sequences (contexts 239) and one returning user (208 cached + 34 new tokens)" in out
    rows = [line.split() for line in out.splitlines() if " eager " in line]
    # on the CPU every step runs eagerly: a time each, no graph
    assert [r[-3:] for r in rows] == [["graph", "-", "nan"]] * 3 and len(rows) == 3


async def test_chat_think_long_pairs_a_small_host_tier_with_and_without_disk(capsys):
    """chat-think-long: long histories, the small host tier alone and with a disk, each run
    twice (`--repeat`): the disk tier's own effect is one ratio of one run."""
    args = bench.build_parser().parse_args(
        ["--workloads", "chat-think-long", "--scale", str(2 / 24), "--length", "0.05", "--think-s", "0.02",
         "--think-configs", "small-host,small-host+disk", "--repeat", "2", "--no-peer"])
    rows = await bench.main_async(args)
    assert [(r["config"], r["run"]) for r in rows] == [("small-host", 0), ("small-host+disk", 0),
                                                      ("small-host", 1), ("small-host+disk", 1)]
    alone, with_disk = rows[0], rows[1]
    assert alone["gpu_blocks"] == round(4096 * 2 / 24) and alone["host_blocks"] == round(1024 * 2 / 24)
    assert with_disk["host_blocks"] == alone["host_blocks"] and alone["disk_writes"] == 0
    assert [x["round"] for x in alone["rounds"]] == [1, 2, 3, 4]
    bench.print_think_table(rows)
    out = capsys.readouterr().out
    assert "chat-think-long, rounds >= 2" in out and "small-host+disk #2" in out
