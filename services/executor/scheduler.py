"""The step loop's scheduling: which sequences run in the next forward and with how many
tokens, within a token budget (max_step_tokens), a sequence budget (max_batch_size), an adapter
budget (max_step_adapters) and the KV blocks free; running sequences first (decodes, then
prefill chunks), preempting the most recently admitted ones when blocks run out, then
admissions from the waiting queues by tenant fairness (sequence.py's FairQueue), with a
preemption per step for a waiting tenant under its share of the batch (fair_share_preemption),
and first-token steps: while other tenants' sequences fill the batch, the prefill of a tenant
with nothing running runs in a step of its own (first_token_steps), so that its time to first
token is a small step, not a full batch's.

The Scheduler works on the step loop's shared state (batch_state.py: the running list, the
waiting queues, the counters), the KV manager (its blocks) and the adapter residency (the
admitted sequence's slot); it retires what the cache cannot hold through the OutputProcessor.
schedule() returns the StepPlan the engine then runs as one forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mintmesh.services.executor.requests import FINISH_LENGTH
from mintmesh.services.executor.sequence import Sequence as Seq

if TYPE_CHECKING:
    from mintmesh.services.executor.batch_state import BatchState, StepLimits
    from mintmesh.services.executor.kv_manager import KVManager
    from mintmesh.services.executor.output import OutputProcessor
    from mintmesh.services.executor.residency import AdapterResidency

logger = logging.getLogger(__name__)

__all__ = ["FIRST_TOKEN_MIN_RUNNING", "Scheduler", "StepPlan"]

# Running sequences from which a first-token step pays: below it a step of the whole batch
# costs about what a step of one prefill does (the step's fixed cost dominates).
FIRST_TOKEN_MIN_RUNNING = 8


@dataclass
class StepPlan:
    """One step's schedule: (sequence, tokens this step) for every sequence in the forward, in
    the forward's order; the sequences admitted and preempted to make it."""

    seqs: list[tuple[Seq, int]] = field(default_factory=list)
    admitted: int = 0
    preempted: int = 0


class Scheduler:
    """Admission, budgets, tenant fairness and preemption for one engine (its step thread)."""

    def __init__(
        self,
        batch: BatchState,
        limits: StepLimits,
        kvm: KVManager,
        residency: AdapterResidency,
        output: OutputProcessor,
    ) -> None:
        self.batch = batch
        self.limits = limits
        self.kvm = kvm
        self.residency = residency
        self.output = output
        self.admit_counter = 0

    def fair_share(self) -> tuple[dict[str, int], int, set[str]]:
        """(running sequences per tenant, each tenant's share of the batch, the waiting tenants
        under it)."""
        b = self.batch
        counts: dict[str, int] = {}
        for s in b.running:
            counts[s.tenant] = counts.get(s.tenant, 0) + 1
        waiting = b.fair.tenants()
        share = max(1, self.limits.max_batch_size // max(1, len(set(counts) | waiting)))
        return counts, share, {t for t in waiting if counts.get(t, 0) < share}

    def preempt_for_fairness(self) -> int:
        """A full batch and a waiting tenant under its share: preempt the newest sequence of
        the tenant most over its share (at most one per step, so a tenant's burst is not
        recomputed wholesale). Returns the number preempted."""
        b, lim = self.batch, self.limits
        if not lim.fair_share_preemption or len(b.running) < lim.max_batch_size:
            return 0
        counts, share, under = self.fair_share()
        if not under:
            return 0
        over = max(counts, key=lambda t: counts[t])
        if counts[over] <= share:
            return 0
        victim = max((s for s in b.running if s.tenant == over), key=lambda s: s.admit_order)
        self.preempt(victim)
        b.fair_preemptions += 1
        return 1

    def first_token_step(self) -> set[str] | None:
        """This step may be a first-token step: the tenants running (their sequences wait this
        step, and their waiting requests are not admitted in it); None: a step as usual.
        Only while at least FIRST_TOKEN_MIN_RUNNING sequences run, the batch has a free slot,
        a tenant with nothing running waits, and the last step was not one."""
        b, lim = self.batch, self.limits
        if (
            not lim.first_token_steps
            or b.last_first_token_step
            or len(b.running) < FIRST_TOKEN_MIN_RUNNING
            or len(b.running) >= lim.max_batch_size
        ):
            return None
        running = {s.tenant for s in b.running}
        if b.fair.peek(exclude=running) is None:
            return None
        return running

    def schedule(self) -> StepPlan:
        """(sequence, tokens this step) for every sequence in the forward; admitted, preempted."""
        b, lim, kvm = self.batch, self.limits, self.kvm
        preempted = self.preempt_for_fairness()
        only_new = self.first_token_step()
        if only_new is not None:
            sched: list[tuple[Seq, int]] = []
            admitted, _ = self._admit(sched, set(), lim.max_step_tokens, only_new)
            if sched:
                b.last_first_token_step = True
                b.first_token_steps += 1
                return StepPlan(sched, admitted, preempted)
            # Nothing fitted (KV blocks, the adapter budget): a step as usual.
        b.last_first_token_step = False
        budget = lim.max_step_tokens
        sched = []
        done: set[int] = set()
        # Running sequences: decodes first, then prefill chunks; oldest first within each.
        order = sorted(b.running, key=lambda s: (not s.decoding, s.admit_order))
        for seq in order:
            if seq.seq_id in done or seq not in b.running or budget <= 0:
                continue
            # A prefill chunk shrinks to the blocks free; a sequence that cannot take even one
            # token preempts the most recently admitted sequences.
            while kvm.room(seq, 0) < 1:
                victim = self.victim(exclude=done)
                if victim is None or victim is seq:
                    break
                self.preempt(victim)
                preempted += 1
            room = kvm.room(seq, 0)
            if room < 1:
                if not sched and len(b.running) == 1:
                    # Alone and still too big: the cache cannot hold this sequence.
                    logger.warning(
                        "sequence %d needs more than the %d tokens the KV cache holds; ending it",
                        seq.seq_id,
                        kvm.kv.capacity_tokens,
                    )
                    self.output.retire(seq, reason=FINISH_LENGTH)
                else:
                    self.preempt(seq)
                    preempted += 1
                continue
            n = min(seq.remaining, budget, room)
            kvm.acquire_blocks(seq, n)
            sched.append((seq, n))
            done.add(seq.seq_id)
            budget -= n
        admitted, _ = self._admit(sched, done, budget, None)
        return StepPlan(sched, admitted, preempted)

    def _admit(
        self,
        sched: list[tuple[Seq, int]],
        done: set[int],
        budget: int,
        only_new: set[str] | None,
    ) -> tuple[int, int]:
        """Admissions from the waiting queues into sched, by tenant fairness, keeping a few
        blocks free for the running ones; only_new: a first-token step, only tenants not in
        it. Returns (admitted, the token budget left)."""
        b, lim, kvm = self.batch, self.limits, self.kvm
        admitted = 0
        in_use = {s.digest for s in b.running if s.digest}
        while budget > 0 and len(b.running) < lim.max_batch_size:
            if only_new is not None:
                seq = b.fair.peek(exclude=only_new)
            else:
                # A tenant at its share waits while one under it is waiting (fair_share).
                counts, share, under = self.fair_share()
                at_share = {t for t, c in counts.items() if c >= share} if under else set()
                seq = b.fair.peek(exclude=at_share) or b.fair.peek()
            if seq is None:
                break
            if (
                lim.max_step_adapters
                and seq.digest
                and seq.digest not in in_use
                and len(in_use) >= lim.max_step_adapters
            ):
                break  # the adapter budget: it waits for a running adapter to leave
            hit = kvm.match_prefix(seq)
            n = min(seq.remaining, budget, kvm.room(seq, kvm.watermark if b.running else 0))
            if n < 1:
                if hit:  # back to the cache; looked up again next time
                    kvm.release_blocks(seq)
                break
            b.fair.remove(seq)
            if kvm.prefix_caching:  # every admission, re-admissions after preemption too
                b.prefix_query_tokens += len(seq.tokens)
                b.prefix_hit_tokens += hit
            self.admit_counter += 1
            seq.admit_order = self.admit_counter
            # Running from here on: should anything below fail, the step's failure path
            # retires it with the batch (its blocks and prefix references freed).
            b.running.append(seq)
            kvm.acquire_blocks(seq, n)
            seq.slot = self.residency.slot(seq.digest) if seq.digest else -1
            if seq.slot is None:  # cannot happen: the sequence holds a reference
                raise RuntimeError(f"adapter {seq.digest} of sequence {seq.seq_id} not resident")
            if seq.digest:
                in_use.add(seq.digest)
            b.waiting_left(seq.tenant)
            sched.append((seq, n))
            done.add(seq.seq_id)
            budget -= n
            admitted += 1
        return admitted, budget

    def victim(self, exclude: set[int]) -> Seq | None:
        """The most recently admitted running sequence not yet scheduled this step."""
        cands = [s for s in self.batch.running if s.seq_id not in exclude]
        return max(cands, key=lambda s: s.admit_order) if cands else None

    def preempt(self, seq: Seq) -> None:
        """Free seq's KV blocks; it waits again (front of its tenant's queue) and is recomputed
        from its prompt and the tokens it generated so far (its full blocks stay cached, so
        with prefix caching it usually takes them back instead of recomputing them)."""
        b = self.batch
        self.kvm.release_blocks(seq)
        seq.preemptions += 1
        seq.handle.preemptions = seq.preemptions
        b.preemptions += 1
        b.running.remove(seq)
        b.fair.push(seq, front=True)
        b.waiting_again(seq.tenant)
        logger.debug("preempted sequence %d (%d tokens)", seq.seq_id, len(seq.tokens))
