"""Fair share between tenants: which waiting request is admitted next, and who gives up a slot
of the batch.

Within a priority level, the tenant that has been served least, weighted, goes first: a
virtual token counter per tenant (Sheng et al., "Fairness in Serving Large Language Models",
OSDI 2024) grows by the tokens computed for it — a prompt token counts 1, an output token
OUTPUT_TOKEN_COST (a decode row costs a step more than a prompt token does) — divided by the
tenant's weight. A tenant that was idle has its counter lifted to the least counter among the
active tenants, so that idle time banks no credit (and, tied with it, goes first: it has fewer
sequences running). Within a tenant the order is urgency
(priority, then arrival). Without tenants every request is tenant "" and the order is the plain
urgency order.

A tenant may have a cap on running sequences (`max_running`). When the batch is full
(`max_num_seqs`), a waiting tenant below its weighted share of the slots takes one from the
tenant furthest above its own share: that tenant's least urgent running sequence is preempted
(it resumes from the cache), unless it is more urgent than the request waiting.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sequence import Sequence

OUTPUT_TOKEN_COST = 2


@dataclass(frozen=True)
class TenantShare:
    weight: float = 1.0        # its share of the service, relative to the other tenants' weights
    max_running: int = 0       # most sequences it may have running; 0 = no cap
    max_kv_share: float = 1.0  # above this share of the GPU pool its cached blocks are evicted first


class FairQueue:
    """The waiting requests, one urgency heap per tenant, and each tenant's service counter."""

    def __init__(self, shares: dict[str, TenantShare] | None = None) -> None:
        self.shares = shares or {}
        self.served: defaultdict[str, float] = defaultdict(float)   # virtual tokens, per tenant
        self._heaps: dict[str, list[tuple[tuple[int, int], Sequence]]] = {}

    def share(self, tenant: str) -> TenantShare:
        return self.shares.get(tenant) or TenantShare()

    def __len__(self) -> int:
        return sum(map(len, self._heaps.values()))

    def sequences(self) -> Iterable[Sequence]:
        return (seq for heap in self._heaps.values() for _, seq in heap)

    def tenants(self) -> set[str]:
        """The tenants with requests waiting."""
        return {t for t, heap in self._heaps.items() if heap}

    def add(self, seq: Sequence, active: set[str]) -> None:
        """Queue a new request; `active`: the tenants with requests running or waiting. A tenant
        arriving from idle starts at the least counter among them."""
        if seq.tenant not in active and active:
            self.served[seq.tenant] = max(self.served[seq.tenant], min(self.served[t] for t in active))
        self.requeue(seq)

    def requeue(self, seq: Sequence) -> None:
        """Queue a request again (preempted, or not admitted this step): its counter stands."""
        heapq.heappush(self._heaps.setdefault(seq.tenant, []), (seq.urgency(), seq))

    def remove(self, seq: Sequence) -> None:
        heap = self._heaps.get(seq.tenant, [])
        heap[:] = [(k, s) for k, s in heap if s is not seq]
        heapq.heapify(heap)

    def charge(self, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        self.served[tenant] += (prompt_tokens + OUTPUT_TOKEN_COST * output_tokens) / self.share(tenant).weight

    def pop(self, running: Counter[str]) -> Sequence | None:
        """The next request to admit: the most urgent head; among equals the least served
        tenant, then the one with fewer sequences running (a tenant just lifted ties with the
        least served: it goes first), then the earlier arrival. Tenants at their `max_running`
        cap (counts in `running`) wait. None: nothing may be admitted."""
        best = None
        for tenant, heap in self._heaps.items():
            cap = self.share(tenant).max_running
            if not heap or (cap and running[tenant] >= cap):
                continue
            (negated_priority, arrival), _ = heap[0]
            key = (negated_priority, self.served[tenant], running[tenant], arrival)
            if best is None or key < best[0]:
                best = key, tenant
        return None if best is None else heapq.heappop(self._heaps[best[1]])[1]

    def slot_for(self, seq: Sequence, running: list[Sequence], max_seqs: int) -> Sequence | None:
        """The batch is full: the running sequence whose slot `seq` takes — of the tenant
        furthest above its weighted share of `max_seqs`, its least urgent, none more urgent
        than `seq` — if `seq`'s tenant is below its own share."""
        counts = Counter(s.tenant for s in running)
        active = set(counts) | self.tenants() | {seq.tenant}
        total = sum(self.share(t).weight for t in active)
        fair = {t: max_seqs * self.share(t).weight / total for t in active}
        if counts[seq.tenant] + 1 > fair[seq.tenant]:
            return None
        over = [s for s in running if counts[s.tenant] > fair[s.tenant] and s.priority <= seq.priority]
        if not over:
            return None
        return max(over, key=lambda s: (counts[s.tenant] - fair[s.tenant], s.urgency()))
