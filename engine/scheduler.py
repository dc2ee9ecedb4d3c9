"""Continuous batching: which tokens of which sequences run in the next step.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first, most urgent first (priority, then arrival), each taking what it
still has to compute: one token when decoding, a chunk of its prompt when prefilling, so a long
prompt is spread over steps instead of stalling the decodes. Then waiting sequences are
admitted in the same order.

When the GPU pool runs dry, the store first evicts cached blocks; after that the least urgent
running sequence is preempted: it gives its blocks back to the cache (its full blocks, prompt
and generated, are indexed) and waits again. They are evicted like any cached blocks, so just
as many as the GPU needs move to the host tier (least recently used first; the preempted ones
were used last) and on to disk, and the sequence resumes with an ordinary prefix hit: from the
GPU if its blocks were not needed after all, else from the host tier or disk; it recomputes
only its last, partial block and what the tiers could not keep. (A swap to host slots the
sequence owns would copy all its blocks, keep them out of the cache, and need them all back
on the GPU at once to resume.) A waiting request that is more urgent than a running one may
preempt it the same way.

A prompt whose cached prefix is partly on disk computes from the front, at full speed, while the
store reads the disk part from the back; when the computed front reaches the blocks read, the
prompt jumps past them (`_tokens_to_compute`). It never waits for a read (but in "load" mode).

A request whose admission or growth fails for any reason other than a lack of blocks is put in
the plan's `failed` list (the engine ends it with an error); it never fails the others.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.costs import LoadOrRecompute
from engine.fairness import FairQueue, TenantShare
from engine.sequence import Sequence, Status
from store import BlockStore, OutOfBlocks, PrefixMatch, Tier
from store.loader import STALLED_S

log = logging.getLogger("kvgate.engine")


@dataclass
class Chunk:
    """`num_tokens` tokens of `seq`, from position `start`, computed in this step."""
    seq: Sequence
    start: int
    num_tokens: int
    samples: bool = field(init=False)   # it reaches the sequence's last token: the step samples the next

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class Plan:
    """One step: the chunks to compute, and the requests that could not be scheduled."""
    chunks: list[Chunk] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, store: BlockStore, costs: LoadOrRecompute,
                 wakeup: Callable[[], None] = lambda: None, max_model_len: int | None = None,
                 tenants: dict[str, TenantShare] | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len      # a sequence this long ends: it computes no more
        self.store = store
        self.costs = costs
        self.wakeup = wakeup        # a disk load made progress: schedule again
        self.running: list[Sequence] = []
        self._waiting = FairQueue(tenants)      # by urgency, and between tenants by service (engine/fairness.py)
        self.num_preemptions = 0
        self.num_blocked_admissions = 0   # steps whose most urgent waiting request found no KV room
        self.num_read_waits = 0           # steps a running sequence sat out, waiting for its disk read ("load" mode)
        self._recheck: asyncio.TimerHandle | None = None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting_ids(self) -> set[str]:
        return {s.request_id for s in self._waiting.sequences()}

    def add(self, seq: Sequence, match: PrefixMatch | None = None) -> None:
        """Queue a new request; start reading the disk part of its `match`."""
        self._waiting.add(seq, {s.tenant for s in self.running} | self._waiting.tenants())
        if match is not None:
            self._start_load(seq, match)

    def schedule(self) -> Plan:
        plan = Plan()
        chunks = plan.chunks
        budget = self.config.max_num_batched_tokens
        for seq in sorted(self.running, key=Sequence.urgency):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:   # preempted earlier in this loop
                continue
            if seq.finish_reason is not None or (seq.pending and self._ends_at_pending(seq)):
                continue                   # aborted, or its last token in flight: read back next
            n = self._tokens_to_compute(seq, budget)
            if n == 0:                              # waiting for its disk blocks
                self.num_read_waits += 1
                continue
            try:
                reserved = self._reserve(seq, n, chunks)
            except Exception:
                log.exception("could not grow %s; failing it", seq.request_id)
                plan.failed.append(seq)
                continue
            if reserved:
                chunks.append(Chunk(seq, seq.num_computed, n))
                budget -= n
        self._admit_waiting(plan)
        for c in chunks:              # what each tenant is served (a decode row costs more)
            decode = c.start >= c.seq.prompt_len
            self._waiting.charge(c.seq.tenant, 0 if decode else c.num_tokens, c.num_tokens if decode else 0)
        return plan

    def _reserve(self, seq: Sequence, n: int, chunks: list[Chunk]) -> bool:
        """GPU slots for `n` more tokens of `seq`, preempting less urgent sequences that are not
        scheduled yet (or `seq` itself, as the last resort). False if `seq` was preempted."""
        while True:
            try:
                self.store.grow(seq.request_id, seq.num_computed + n)
                return True
            except OutOfBlocks:
                scheduled = {c.seq for c in chunks}
                victim = max((s for s in self.running if s not in scheduled), key=Sequence.urgency)
                self.preempt(victim)
                if victim is seq:
                    return False

    def _admit_waiting(self, plan: Plan) -> None:
        chunks = plan.chunks
        skipped = []   # keep their places: a prefix another computes, or a token in flight
        budget = lambda: self.config.max_num_batched_tokens - sum(c.num_tokens for c in chunks)  # noqa: E731
        computing = self._prefix_keys_in_prefill() if len(self._waiting) else set()
        tenants = Counter(s.tenant for s in self.running)
        while budget() > 0 and (seq := self._waiting.pop(tenants)) is not None:
            if seq.pending:     # preempted while its token was in flight: resumes once it is read back
                skipped.append(seq)
                continue
            if seq.status is Status.WAITING and computing and not computing.isdisjoint(keys := self._prompt_keys(seq)):
                # reported only for its own namespace's blocks: that another tenant is sending a
                # public prefix right now is not this request's to know
                seq.waited_for_prefix |= not computing.isdisjoint(keys[seq.keys.scope.shared:])
                skipped.append(seq)
                continue
            if len(self.running) >= self.config.max_num_seqs:     # full: a slot from a tenant above its share
                victim = self._waiting.slot_for(seq, self.running, self.config.max_num_seqs)
                if victim is None:
                    self._waiting.requeue(seq)
                    break
                chunks[:] = [c for c in chunks if c.seq is not victim]
                self.preempt(victim)
                tenants[victim.tenant] -= 1
            try:
                admitted = self._admit(seq, chunks)
            except Exception:
                log.exception("could not admit %s; failing it", seq.request_id)
                plan.failed.append(seq)
                continue
            if not admitted:
                self._waiting.requeue(seq)
                self.num_blocked_admissions += 1
                break
            tenants[seq.tenant] += 1
            n = self._tokens_to_compute(seq, budget())
            if n:
                chunks.append(Chunk(seq, seq.num_computed, n))
            computing.update(self._prompt_keys(seq)[seq.num_computed // self.store.block_size:])
        for seq in skipped:
            self._waiting.requeue(seq)

    def _tokens_to_compute(self, seq: Sequence, budget: int) -> int:
        """The tokens `seq` computes this step: what it has left, within `budget`. A prompt (or a
        preempted sequence, resumed) whose disk blocks are being read computes from the front
        at full speed up to where it is to meet the read (`LoadOrRecompute.read_from`), and
        skips the blocks read once it reaches them. A read not there at the meeting point is
        waited for until it is due (`seq.read_due`); past that, or if the disk has stalled, the
        front computes on through it: a late read costs at most its slack, never a hang. In
        "load" mode the front waits for the whole read (unless the disk stalls). 0 = it waits
        for its blocks this step."""
        limit = seq.num_tokens
        # None: no load (a decoding sequence, all but its last token computed, never has one:
        # every branch below stops the front at the loaded blocks until they are taken)
        step = self.store.advance_load(seq.request_id, seq.num_computed) if seq.num_computed < limit - 1 else None
        if step is not None and step.filled:
            seq.num_computed, seq.read_tokens = step.end * self.store.block_size, 0
            if not seq.preemptions:         # the prompt's cached tokens, as first admitted
                seq.cached_tokens[Tier.DISK] += step.filled * self.store.block_size
        elif step is not None and step.compute_until is not None:
            limit = step.compute_until
            waiting = self.costs.mode == "load" or seq.num_computed >= step.meet
            if not waiting:
                limit = min(limit, step.meet)
            elif not step.reading_done:
                if time.monotonic() < seq.read_due and not self.store.disk_read_queue()[1]:
                    self._check_at(seq.read_due)
                    return 0
                if step.compute_until >= step.end * self.store.block_size:   # late, nothing read yet
                    self.store.drop_load(seq.request_id)
                    limit, seq.read_tokens = seq.num_tokens, 0
        return max(0, min(limit - seq.num_computed, budget))

    def _check_at(self, due: float) -> None:
        """Schedule again at `due` (time.monotonic(), or within STALLED_S): a read waited for
        may be late, or stall, with nothing else to wake the engine."""
        delay = min(max(0.0, due - time.monotonic()), STALLED_S) + 0.001
        loop = asyncio.get_running_loop()
        if self._recheck is None or self._recheck.when() <= loop.time() or self._recheck.when() > loop.time() + delay:
            if self._recheck is not None:
                self._recheck.cancel()
            self._recheck = loop.call_later(delay, self.wakeup)

    def _ends_at_pending(self, seq: Sequence) -> bool:
        """Will the token in flight certainly end `seq` (its length limit, whatever the token)?"""
        return (seq.num_tokens - seq.prompt_len >= seq.params.max_tokens
                or (self.max_model_len is not None and seq.num_tokens >= self.max_model_len))

    def _prefix_keys_in_prefill(self) -> set[bytes]:
        """Keys of the prompt blocks running sequences have yet to index: to compute, or
        computed by a step still in flight. A new request sharing one of them waits until it is
        cached instead of computing the same prefix a second time (many users behind one new
        system prompt)."""
        keys: set[bytes] = set()
        for seq in self.running:
            indexed = self.store.num_indexed(seq.request_id)
            if indexed < seq.prompt_len // self.store.block_size:
                keys.update(self._prompt_keys(seq)[indexed:])
        return keys

    def _prompt_keys(self, seq: Sequence) -> list[bytes]:
        """Keys of the prompt's full blocks."""
        return seq.keys.upto(seq.token_ids, seq.prompt_len // self.store.block_size)

    def _admit(self, seq: Sequence, chunks: list[Chunk]) -> bool:
        """Give `seq` its blocks, with its cached prefix, preempting a less urgent running
        sequence if that is what it takes. False if it must wait."""
        while True:
            try:
                last = len(seq.token_ids) - 1         # computed again to sample the next token
                blocks = self.store.admit(seq.request_id, seq.keys, seq.token_ids, seq.priority,
                                          max_cached_tokens=last, max_tier=seq.max_tier, retention=seq.retention)
                seq.num_computed = blocks.num_cached_tokens
                # part of its prefix went to disk while it waited (or while it was preempted)
                if len(blocks.tiers) < len(seq.found) or seq.num_generated:
                    self._start_load(seq, self.store.match(seq.keys, seq.token_ids, last))
                if seq.cached_tokens is None:
                    seq.cached_tokens = _cached_by_tier(seq.found, blocks.tiers, self.store.block_size)
                    seq.queued_s = time.monotonic() - seq.submitted_at
                break
            except OutOfBlocks:
                less_urgent = [c for c in chunks if c.seq.urgency() > seq.urgency()]
                if not less_urgent:
                    return False
                victim = max(less_urgent, key=lambda c: c.seq.urgency())
                chunks.remove(victim)
                self.preempt(victim.seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    def _start_load(self, seq: Sequence, match: PrefixMatch) -> None:
        """Compute and load at once: start reading the disk part of `match` (`seq`'s cached
        prefix) from the back, down to where the front is expected to meet the read
        (`LoadOrRecompute.read_from`), if the host part is worth loading at all and it has one."""
        if seq.max_tier is Tier.HOST and Tier.DISK in match.tiers:
            first, end = self.store.disk_part(match)
            stop, seconds = self.costs.read_from(first, end, *self.store.disk_read_queue(),
                                                 compute_ahead=self._prefill_ahead(seq))
            seq.read_tokens = 0
            if self.store.start_load(seq.request_id, match, stop, on_progress=self.wakeup):
                seq.read_tokens = (end - stop) * self.store.block_size
                wait = seconds if seconds is not None else math.inf if self.costs.mode == "load" else STALLED_S
                seq.read_due = time.monotonic() + wait

    def _prefill_ahead(self, seq: Sequence) -> int:
        """Prompt tokens the other sequences still have to compute (what their reads bring
        excepted): the GPU computes them before or beside `seq`'s front."""
        ahead = 0
        for s in itertools.chain(self.running, self._waiting.sequences()):
            if s is not seq:
                done = s.num_computed if s.status is Status.RUNNING else \
                    self.store.block_size * sum(t is not Tier.DISK for t in s.found)
                ahead += max(0, s.prompt_len - done - s.read_tokens)
        return ahead

    @staticmethod
    def advance(chunks: list[Chunk]) -> None:
        """Count a launched step's chunks as computed, and the tokens they sample as pending
        (until `Engine._postprocess` reads them back)."""
        row = 0
        for c in chunks:
            c.seq.num_computed = c.start + c.num_tokens
            if c.samples:
                c.seq.pending += 1
                c.seq.sample_row, row = row, row + 1

    def preempt(self, seq: Sequence) -> None:
        """Take `seq` off the GPU: its full blocks stay cached (see the module's docstring),
        those a step in flight writes included (anything that reads them is queued behind it)."""
        self.running.remove(seq)
        self.store.commit(seq.request_id, seq.token_ids, min(seq.num_computed, len(seq.token_ids)))
        self.store.release(seq.request_id)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.preemptions += 1
        self.num_preemptions += 1
        self._waiting.requeue(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and release its blocks (the one exit path)."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self._waiting.remove(seq)
        if seq.status is Status.RUNNING:
            self.store.release(seq.request_id)
        else:
            self.store.drop_load(seq.request_id)    # a disk load may have started at submit
        seq.status = Status.FINISHED


def _cached_by_tier(found: tuple[Tier, ...], admitted: tuple[Tier, ...], block_size: int) -> dict[Tier, int]:
    """Cached prompt tokens per tier: each block counts in the slowest tier it came through
    (where it was when the request arrived, or where admission found it)."""
    counts = {t: 0 for t in Tier}
    for i, tier in enumerate(admitted):
        counts[max(tier, found[i]) if i < len(found) else tier] += block_size
    return counts
