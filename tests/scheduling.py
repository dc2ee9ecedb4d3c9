"""The scheduler and its store, driven with no model (as vLLM tests its scheduler): requests are
added as `Engine.submit` adds them, each step is the plan `Scheduler.schedule` returns, counted
as computed by `Scheduler.advance`, and every token a step samples is a fixed one; a request
ends at its `max_tokens` (`Scheduler.remove`, the engine's one exit). Steps complete before the
next is scheduled (the engine's `async_scheduling = false`). Policy tests assert on the plans."""
from __future__ import annotations

import itertools

from engine.config import EngineConfig
from engine.costs import LoadOrRecompute
from engine.detokenizer import Detokenizer
from engine.fairness import TenantShare
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status
from tests.conftest import BS, make_store

TOKEN = 1          # what every step samples


class SchedulerDriver:
    def __init__(self, gpu: int = 64, host: int = 0, max_batched: int = 32, max_seqs: int = 16,
                 tenants: dict[str, TenantShare] | None = None) -> None:
        self.store = make_store(gpu=gpu, host=host)
        config = EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched, block_size=BS,
                              async_scheduling=False)
        self.scheduler = Scheduler(config, self.store, LoadOrRecompute(self.store), tenants=tenants)
        self._arrivals = itertools.count()

    def add(self, name: str, prompt: list[int], max_tokens: int, priority: int = 0, tenant: str = "") -> Sequence:
        """Queue request `name` (its id) of `tenant` as the engine does."""
        keys = self.store.keys(tenant, prompt)
        match = self.store.match(keys, prompt, max_tokens=len(prompt) - 1)
        seq = Sequence(name, list(prompt), len(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       priority, next(self._arrivals), keys, Detokenizer(None, ()), None, found=match.tiers,
                       tenant=tenant)
        self.scheduler.add(seq, match)
        return seq

    def step(self) -> list[tuple[str, int, int]]:
        """Schedule a step and 'compute' it; its chunks as (request, start, tokens)."""
        plan = self.scheduler.schedule()
        assert not plan.failed, plan.failed
        self.scheduler.advance(plan.chunks)
        for c in plan.chunks:
            seq = c.seq
            if c.samples:
                seq.pending -= 1
                seq.token_ids.append(TOKEN)
            if seq.status is Status.RUNNING:
                self.store.commit(seq.request_id, seq.token_ids, c.start + c.num_tokens)
            if seq.num_generated >= seq.params.max_tokens:
                self.scheduler.remove(seq)
        self.store.check_integrity()
        return [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks]

    def abort(self, seq: Sequence) -> None:
        """End `seq` as `Engine.abort` does, wherever it is (running, waiting, preempted)."""
        self.scheduler.remove(seq)
        self.store.check_integrity()

    def run(self) -> list[list[tuple[str, int, int]]]:
        """Steps until nothing is left to schedule (at most 1,000)."""
        steps = []
        while step := self.step():
            steps.append(step)
            assert len(steps) < 1000, "the scheduler does not finish"
        return steps
