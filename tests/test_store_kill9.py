"""A process writing blocks to the disk tier is killed with SIGKILL mid-write, repeatedly; the
reopened store serves every block it returns with the exact KV that was written."""
import os
import random
import signal
import subprocess
import sys
import textwrap

from tests.conftest import admit_from_disk, assert_loaded_kv, child_env, make_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITER = textwrap.dedent("""
    import asyncio, pathlib, sys
    from tests.conftest import child_env, make_store, run_request
    from tests.test_store_kill9 import prompt

    async def main(path, first):
        store = make_store(pathlib.Path(path), gpu=3, host=3, disk_blocks=100_000)
        for i in range(first, first + 10_000):
            run_request(store, i, prompt(i))   # evictions push older prompts down to disk
            await store.flush()
            print(i, flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def prompt(i: int) -> list[int]:
    return [i, 1, 2, 3] * 3  # 3 blocks, distinct per prompt


async def test_killed_writer_never_leaves_a_block_that_is_served_wrong(tmp_path):
    rng = random.Random(1234)
    written = 0
    for round_ in range(4):
        first = round_ * 10_000
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(first)], cwd=REPO,
                                 env=child_env(), stdout=subprocess.PIPE, text=True)
        for _ in range(rng.randint(3, 12)):   # let it write a while, then kill it mid-stream
            last = int(child.stdout.readline())
        child.send_signal(signal.SIGKILL)
        child.wait()
        written += last - first + 1

        store = make_store(tmp_path, gpu=4, host=4, disk_blocks=100_000)
        served = 0
        for i in [p for r in range(round_ + 1) for p in range(r * 10_000, r * 10_000 + 20)]:
            seq, filled = await admit_from_disk(store, i, prompt(i))
            assert_loaded_kv(store, seq, prompt(i), filled)   # exact KV, not just a valid checksum
            served += filled
            store.release(i)
            store.check_integrity()
        stats = store.stats()
        assert stats.disk.corrupt_dropped == 0, "LMDB lost a committed record's integrity"
        assert served > 0, "nothing came back from disk at all"
        await store.flush()
        store.close()
