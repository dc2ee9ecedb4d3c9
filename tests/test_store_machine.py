"""A Hypothesis state machine over the whole store: random admissions (with shared prefixes),
commits, decode steps, releases, sequences' disk loads, flushes, corrupted disk records and restarts.
After every step `check_integrity()` holds, and every cached block a sequence is given holds
exactly the KV computed for its prefix, whichever tiers it travelled through."""
import asyncio
import dataclasses
import itertools

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
)

from store import OutOfBlocks, Tier
from tests.conftest import BS, assert_cached_kv, block_content, make_store, write_kv

# A few shared "system prompts" of different lengths, so requests hit each other's prefixes.
BASES = [[7] * (3 * BS), [7] * BS + [8] * (2 * BS), [9] * (2 * BS + 1), []]
# a suffix from a seed: Hypothesis' small examples would otherwise all be zeros
FRESH = st.builds(lambda base, seed, n: base + [(seed * 31 + i * 7) % 97 for i in range(n)] or [1],
                  st.sampled_from(BASES), st.integers(0, 1000), st.integers(0, 3 * BS))


def _placed(stats):
    """What the store's own calls change: its stats without the disk tier's I/O counters, which
    its threads update on their own (a write still in flight after the last loop run)."""
    return dataclasses.replace(stats, disk=None)


class StoreMachine(RuleBasedStateMachine):
    prompts = Bundle("prompts")   # prompts seen before, so later rules can hit their KV

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        from pathlib import Path
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name)
        self.loop = asyncio.new_event_loop()
        self.store = self._open()
        self.tokens: dict[int, list[int]] = {}   # running sequences
        self.ids = itertools.count()
        self.admitted_since_restart = 0

    def _open(self):
        return make_store(self.path, gpu=7, host=4, disk_blocks=10)

    def teardown(self) -> None:
        self.loop.run_until_complete(self.store.flush())
        self.store.close()
        self.loop.close()
        self.tmp.cleanup()

    @rule(target=prompts, tokens=st.one_of(FRESH, prompts), priority=st.integers(0, 2))
    def admit(self, tokens, priority):
        tokens = list(tokens)
        seq_id = next(self.ids)
        self.admitted_since_restart += 1
        before = self.store.stats()
        try:
            seq = self.store.admit(seq_id, self.store.root_key(), tokens, priority,
                                   max_cached_tokens=len(tokens) - 1)
        except OutOfBlocks:
            assert _placed(self.store.stats()) == _placed(before), "a failed admission changed the store"
            return tuple(tokens)
        assert_cached_kv(self.store, seq, tokens)
        write_kv(self.store, seq, tokens)
        self.tokens[seq_id] = tokens
        return tuple(tokens)

    @rule(target=prompts, tokens=st.one_of(FRESH, prompts), priority=st.integers(0, 2))
    def request(self, tokens, priority):
        """A whole short request: admit, compute, commit, release."""
        tokens = self.admit(tokens, priority)
        seq_id = max(self.tokens, default=None)
        if seq_id is not None and self.tokens[seq_id] == list(tokens):
            self.store.commit(seq_id, self.tokens.pop(seq_id))
            self.store.release(seq_id)
        return tokens

    @rule(which=st.integers(0, 2**16), part=st.floats(0, 1))
    def commit_some(self, which, part):
        seq_id = _pick(self.tokens, which)
        if seq_id is not None:
            tokens = self.tokens[seq_id]
            self.store.commit(seq_id, tokens, round(part * len(tokens)))

    @rule(which=st.integers(0, 2**16), token=st.integers(0, 3))
    def decode_step(self, which, token):
        seq_id = _pick(self.tokens, which)
        if seq_id is None:
            return
        tokens = self.tokens[seq_id]
        try:
            self.store.grow(seq_id, len(tokens) + 1)
        except OutOfBlocks:
            return
        tokens.append(token)
        write_kv(self.store, self.store._seqs[seq_id], tokens)
        self.store.commit(seq_id, tokens)

    @rule(which=st.integers(0, 2**16))
    def release(self, which):   # finished, aborted, or preempted (it would come back as a new admission)
        seq_id = _pick(self.tokens, which)
        if seq_id is None:
            return
        self.store.commit(seq_id, self.tokens.pop(seq_id))
        self.store.release(seq_id)

    @rule(target=prompts, tokens=prompts, computed=st.integers(0, 3))
    def compute_and_load(self, tokens, computed):
        """A whole request whose disk part is read from the back while `computed` blocks are
        computed from the front: the blocks copied in hold exactly their prefix's KV."""
        tokens, seq_id = list(tokens), next(self.ids)
        match = self.store.match(self.store.root_key(), tokens, len(tokens) - 1)
        async def read_it_all():                    # the read runs on the loop's reader threads
            if self.store.start_load(seq_id, match):
                await next(sl.task for sl in self.store.loader.sequence_loads() if sl.seq_id == seq_id)
        self.loop.run_until_complete(read_it_all())
        try:
            seq = self.store.admit(seq_id, self.store.root_key(), tokens, max_cached_tokens=len(tokens) - 1)
        except OutOfBlocks:
            self.store.drop_load(seq_id)
            return tuple(tokens)
        front = seq.num_cached_tokens // BS + computed  # the front computed `computed` blocks;
        for slot in seq.slots[front:]:                   # the rest is not written yet
            self.store.gpu.tensor[slot].zero_()
        step = self.store.advance_load(seq_id, front * BS)
        if step is not None and step.filled:             # what was read fills in after the front
            keys = seq.keys.all(tokens)
            for i in range(front, front + step.filled):
                got = self.store.gpu.tensor[seq.slots[i]].cpu()
                assert torch.equal(got, block_content(keys[i])), f"block {i} read wrong"
        self.store.drop_load(seq_id)
        write_kv(self.store, seq, tokens)                # the forward pass, for the commit below
        self.store.commit(seq_id, tokens)
        self.store.release(seq_id)
        return tuple(tokens)

    @rule()
    def flush(self):
        self.loop.run_until_complete(self.store.flush())

    @rule(which=st.integers(0, 2**16))
    def corrupt_a_record(self, which):
        self.loop.run_until_complete(self.store.flush())
        key = _pick(self.store.disk.sizes, which)
        if key is None:
            return

        def flip(env=self.store.disk._env):  # on the disk tier's I/O thread
            with env.begin(write=True) as txn:
                value = bytearray(txn.get(key))
                value[-1] ^= 0x55
                txn.put(key, bytes(value))
        self.store.disk._io.submit(flip).result()

    @rule(graceful=st.booleans())
    def restart(self, graceful):
        if self.tokens or self.admitted_since_restart < 8:
            return
        if graceful:
            self.store.persist()
        self.loop.run_until_complete(self.store.flush())
        # records survive if their whole prefix is on disk; the scan deletes the others
        survivors = {n.key for n in self.store.index.nodes()
                     if all(a.on_disk for a in _ancestors_and_self(n))}
        self.store.close()
        self.store = self._open()
        self.admitted_since_restart = 0
        assert set(self.store.disk.sizes) == survivors, "the restart lost or invented records"

    @invariant()
    def integrity(self):
        self.store.check_integrity()
        if not self.tokens:
            writing = len(self.store.placement.writing_slots)   # freed when their writes are done
            for t, held in ((Tier.GPU, 0), (Tier.HOST, writing)):
                assert self.store.stats().tiers[t].locked == held, "blocks leaked"


def _pick(items, which: int):
    """One of `items` (None if empty), chosen by a number drawn whatever they are: whether an
    admission or a growth found room can depend on when the disk thread finished a write, so
    no draw, and no rule's precondition, may depend on them (Hypothesis replays a choice
    sequence and requires the same draws)."""
    ordered = sorted(items)
    return ordered[which % len(ordered)] if ordered else None


def _ancestors_and_self(node):
    while not node.is_root:
        yield node
        node = node.parent


StoreMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStoreMachine = StoreMachine.TestCase
