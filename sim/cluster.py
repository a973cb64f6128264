"""The discrete-event cluster: P prefill and D decode workers behind the simulated router.

One request's path, as in the mesh (services/router/request_flow.py): arrival -> placement (the
router's plugins) -> either remote prefill (prefill worker FIFO; prefix hits from its KV cache;
then the decode worker reserves KV blocks, pulls the prompt's KV over its inbound link, releases
the prefill worker's lease, and the first token goes out) or local prefill on the decode worker
(one mixed step: the prompt plus one decode token for every running sequence; the first token at
its end; or, when the engine's prompts-first rule says it pays, the prompt alone while the
running sequences wait a step, CostModel.prompts_first_pays) -> continuous-batching decode until
output_tokens are out.

Invariant: sim time only moves forward through the event heap; every worker change that the
router could see (KV events, load) happens inside an event at the current time.

Decode steps are not simulated one by one: while a decode worker's batch does not change, its
steps are identical but for the context growing by the batch size each step, so a run of n steps
is one event (time from a closed form). A sequence joining mid-run cuts the run at the end of the
step in progress, where the real engine would admit it. Prefill workers run chunked prefill
steps like the engine's scheduler (PrefillWorker). Every call the services make into an engine
runs on its engine thread between two steps (services/common/engine_runner.py), so it waits for
the step in flight: a finished prompt's blocks are collected for lending, and a pulled prompt's
blocks reserved and then handed to the decode engine, only at a step boundary (`_command`). Every step or run is computed on the worker's
Host (sim/host.py): its own device, or one CPU shared by all workers when the cost profile says so
(host_cores), where a step stretches while other workers compute. Modelling choices, stated: a
decode worker reserves KV for the whole output when it admits a sequence (no preemption);
transfers into one decode worker share its link one at a time.
"""

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from services.router.placement.base import LoadView
from services.router.placement.runner import NoCandidates, load_profile
from sim.costs import CostModel
from sim.host import Host, slowdown_curve
from sim.kv_cache import KvCache
from sim.router import SimRouter, TraceRequest
from sim.trace import Request

MAX_PROMPT_ONLY_STEPS = SchedulerConfig().max_prompt_only_steps  # the decode engine's default


@dataclass
class Job:
    """One request's life in the cluster (times in sim seconds)."""

    req: Request
    decode_id: str = ""
    prefill_id: str = ""  # "" when prefilled on the decode worker
    cached_tokens: int = 0  # prompt tokens found in the prefilling worker's cache
    first_token_s: float | None = None
    end_s: float | None = None
    rejected: str = ""  # why it could not be served
    held: dict = field(default_factory=dict)  # worker id -> (hashed blocks, unhashed count)


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def _lease(cache: KvCache, worker_id: str, job: Job, block_size: int, reserve_tokens: int) -> bool:
    """References the prompt's cached leading blocks (the last token is always computed) and
    allocates the rest of reserve_tokens' blocks; sets job.cached_tokens and job.held[worker_id].
    False, taking nothing, when the cache has no room."""
    n = job.req.prompt_tokens
    hits = cache.match(job.req.block_hashes, (n - 1) // block_size)
    hashes = job.req.block_hashes[:hits]
    new = _blocks(reserve_tokens, block_size) - hits
    if not cache.can_acquire(hashes, new):
        return False
    cache.acquire(hashes, new)
    job.cached_tokens = hits * block_size
    job.held[worker_id] = (list(hashes), new)
    return True


def _store_computed(cache: KvCache, worker_id: str, job: Job) -> None:
    """The prompt's full blocks past the ones job holds hashed are computed now: registers them
    (job.held[worker_id] moves those stored from its unhashed count to its hashed list)."""
    hashed, unhashed = job.held[worker_id]
    stored = cache.store(job.req.block_hashes[len(hashed):])
    job.held[worker_id] = (hashed + stored, unhashed - len(stored))


class Cluster:
    def __init__(self, costs: CostModel, num_prefill: int, num_decode: int, profile: str = "prefix_aware",
                 block_size: int = 512, seed: int = 0, report_interval_s: float = 0.2):
        if num_decode < 1 or num_prefill < 0:
            raise ValueError("need at least one decode worker and a non-negative number of prefill workers")
        self.costs, self.block_size, self.now = costs, block_size, 0.0
        self._heap: list = []
        self._seq = 0
        capacity = costs.kv_capacity_blocks(block_size)
        # One shared host when the profile says workers share a CPU, else a device per worker.
        shared = costs.host_cores and slowdown_curve(costs.host_slowdown, costs.host_cores, costs.host_background_cores)
        self._shared_host = Host(lambda: self.now, self.at, shared) if shared else None
        self.prefill = {f"prefill-{i}": PrefillWorker(f"prefill-{i}", self, capacity) for i in range(num_prefill)}
        self.decode = {f"decode-{i}": DecodeWorker(f"decode-{i}", self, capacity) for i in range(num_decode)}
        roles = {**dict.fromkeys(self.prefill, "prefill"), **dict.fromkeys(self.decode, "decode")}
        self.router = SimRouter(load_profile(profile, seed), roles, self._load_of, lambda: self.now,
                                report_interval_s)

    # -- the loop ---------------------------------------------------------------------------------

    def at(self, t: float, fn, *args) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self, requests: list[Request], progress=None) -> list[Job]:
        """Simulates every request to completion; progress(n) is called as arrivals are placed."""
        jobs = [Job(r) for r in requests]
        arrivals = iter(sorted(jobs, key=lambda j: j.req.arrival_s))
        nxt = next(arrivals, None)
        heap = self._heap
        while nxt is not None or heap:
            if nxt is not None and (not heap or nxt.req.arrival_s <= heap[0][0]):
                self.now = nxt.req.arrival_s
                self._arrive(nxt)
                if progress:
                    progress(1)
                nxt = next(arrivals, None)
                continue
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)
        return jobs

    # -- the router's side ------------------------------------------------------------------------

    def _arrive(self, job: Job) -> None:
        r = job.req
        if _blocks(r.prompt_tokens + r.output_tokens, self.block_size) > self.costs.kv_capacity_blocks(self.block_size):
            job.rejected = "prompt + output exceed one worker's KV cache"
            return
        try:
            placement = self.router.place(TraceRequest(r.request_id, r.block_hashes, r.prompt_tokens, r.block_size))
        except NoCandidates as exc:  # the real router answers RESOURCE_EXHAUSTED: the request is not served
            job.rejected = str(exc)
            return
        job.decode_id = placement.decode.worker.worker_id
        self.router.track(job.decode_id, 0)
        rpc = self.costs.rpc_s
        if placement.prefill is None:
            self.at(self.now + rpc, self.decode[job.decode_id].submit_local, job)
            return
        job.prefill_id = placement.prefill.worker.worker_id
        self.router.track(job.prefill_id, r.prompt_tokens)
        self.at(self.now + rpc, self.prefill[job.prefill_id].submit, job)

    def prefilled(self, job: Job) -> None:
        """The prefill RPC returned: the router calls the decode worker with the KV handle."""
        self.router.track(job.prefill_id, job.req.prompt_tokens, -1)
        self.at(self.now + self.costs.rpc_s, self.decode[job.decode_id].submit_import, job)

    def finished(self, job: Job) -> None:
        job.end_s = self.now
        self.router.track(job.decode_id, 0, -1)

    def host(self) -> Host:
        """Where a new worker computes."""
        return self._shared_host or Host(lambda: self.now, self.at)

    def _load_of(self, worker_id: str) -> LoadView:
        worker = self.prefill.get(worker_id) or self.decode[worker_id]
        return worker.load()

    def on_kv_event(self, worker_id: str, kind: str, hashes: list[int]) -> None:
        self.router.on_kv_event(worker_id, kind, hashes)


class PrefillWorker:
    """Chunked prefill as the engine schedules it: each step computes up to prefill_chunk_tokens
    prompt tokens, prompts already started first (in arrival order), then waiting ones admitted
    while there is budget, a slot (max_batch) and KV room; a prompt's first token comes at the end
    of the step that computes its last chunk. Its blocks stay leased until the decode worker has
    pulled them."""

    def __init__(self, worker_id: str, cluster: Cluster, capacity_blocks: int):
        self.id, self.cluster, self.costs = worker_id, cluster, cluster.costs
        self.cache = KvCache(capacity_blocks, lambda kind, hashes: cluster.on_kv_event(worker_id, kind, hashes))
        self.host = cluster.host()
        self.waiting: deque[Job] = deque()
        self.running: list[list] = []  # [job, uncached tokens, tokens computed so far]
        self.stepping = False
        self.busy_s = 0.0
        self._step_start = 0.0
        self._queued_tokens = 0
        self._collecting: list[Job] = []  # finished prompts whose collect waits for the step in flight
        self._arrived_during_step = False  # a prompt's add_request is queued for the engine thread

    def load(self) -> LoadView:
        return LoadView(len(self.waiting), len(self.running), self.cache.used_blocks, self.cache.capacity,
                        self._queued_tokens, max_running=self.costs.max_batch)

    def submit(self, job: Job) -> None:
        self.waiting.append(job)
        self._queued_tokens += job.req.prompt_tokens
        self._arrived_during_step = True
        self._kick()

    def release(self, job: Job) -> None:
        """The decode worker pulled the KV: the lease ends, the blocks stay cached (evictable)."""
        self.cache.release(*job.held.pop(self.id))
        self._kick()

    def _kick(self) -> None:
        """Starts a step at the end of this instant, so prompts arriving together share it."""
        if not self.stepping:
            self.stepping = True
            self.cluster.at(self.cluster.now, self._step)

    def _admit(self) -> list | None:
        job = self.waiting[0]
        if not _lease(self.cache, self.id, job, self.cluster.block_size, job.req.prompt_tokens):
            return None  # every block is leased out; a release restarts this
        self.waiting.popleft()
        seq = [job, job.req.prompt_tokens - job.cached_tokens, 0]
        self.running.append(seq)
        return seq

    def _step(self) -> None:
        costs, budget, chunks = self.costs, self.costs.prefill_chunk_tokens, []
        for seq in self.running:
            if budget <= 0:
                break
            budget -= self._chunk(seq, budget, chunks)
        while self.waiting and budget > 0 and len(self.running) < costs.max_batch:
            seq = self._admit()
            if seq is None:
                break
            budget -= self._chunk(seq, budget, chunks)
        if not chunks:
            self.stepping = False
            return
        step_s = costs.prefill_fixed_s() + costs.prefill_tokens_s(sum(n for _, n in chunks))
        step_s += costs.attention_s([(n, seq[0].cached_tokens + seq[2]) for seq, n in chunks])
        self.stepping = True
        self._step_start = self.cluster.now
        self._arrived_during_step = False
        self.host.start(self.id, step_s, self._end_step, chunks)

    @staticmethod
    def _chunk(seq: list, budget: int, chunks: list) -> int:
        n = min(seq[1] - seq[2], budget)
        chunks.append((seq, n))
        return n

    def _end_step(self, chunks) -> None:
        """A prompt's last chunk is done: its first token is handed out, and the service then asks
        the engine thread for its blocks (PrefillWorker.prefill's collect), a moment later. The
        engine thread first runs the calls queued during the step (prompts that arrived), and
        the collect makes it into that batch; with none queued but work left in the engine
        (chunks of a long prompt, prompts admitted earlier), the thread goes straight into the
        next step and the collect, with the RPC's return, waits for that step to end."""
        self.busy_s += self.cluster.now - self._step_start
        finished = []
        for seq, n in chunks:
            seq[2] += n
            if seq[2] >= seq[1]:
                self.running.remove(seq)
                _store_computed(self.cache, self.id, seq[0])
                self._queued_tokens -= seq[0].req.prompt_tokens
                finished.append(seq[0])
        calls_queued = self._arrived_during_step
        collected, self._collecting = self._collecting, []
        for job in collected:
            self.cluster.prefilled(job)
        self._step()
        if self.stepping and not calls_queued:
            self._collecting = finished
        else:
            for job in finished:
                self.cluster.prefilled(job)


class DecodeWorker:
    """Continuous batching: runs of identical steps, cut when the batch changes or the engine
    thread has a command to run."""

    def __init__(self, worker_id: str, cluster: Cluster, capacity_blocks: int):
        self.id, self.cluster, self.costs = worker_id, cluster, cluster.costs
        self.cache = KvCache(capacity_blocks, lambda kind, hashes: cluster.on_kv_event(worker_id, kind, hashes))
        self.host = cluster.host()
        self.imports: deque[Job] = deque()  # waiting for KV room to pull into
        self.local: deque[Job] = deque()  # to prefill here
        self.joining: deque[list] = deque()  # [job, tokens left, context] ready to join the batch
        self.running: list[list] = []
        self.link_free_s = 0.0
        self.busy_s = 0.0
        self._run = None  # (steps planned, first step s, growth per step s, local job or None)
        self._run_decodes = True  # whether the running sequences advance in the run in flight
        self._prompt_only_steps = 0  # prompt-only steps in a row (bounded as the engine bounds them)
        self._run_start = 0.0
        self._commands: list = []  # (fn, args) waiting for the step in flight to end

    def load(self) -> LoadView:
        queued = sum(j.req.prompt_tokens for j in self.local)
        return LoadView(len(self.local) + len(self.joining), len(self.running), self.cache.used_blocks,
                        self.cache.capacity, queued, max_running=self.costs.max_batch)

    # -- arrivals: each is a call into the engine (DecodeWorker.decode in services/decode) -------

    def submit_import(self, job: Job) -> None:
        self._command(self._reserve, job)

    def submit_local(self, job: Job) -> None:
        self._command(self.local.append, job)

    def _command(self, fn, *args) -> None:
        """fn(*args) runs on the engine thread: now when it is idle, else once the step in flight
        ends (the run is cut there), before the next step is planned."""
        if self._run is None:
            fn(*args)
            self._next_run()
        else:
            self._commands.append((fn, args))
            self._cut()

    def _reserve(self, job: Job) -> None:
        """reserve_for_import: blocks for the prompt and its output (a retry once blocks free up)."""
        self.imports.append(job)
        self._reserve_imports()

    def _reserve_imports(self) -> None:
        bs, now = self.cluster.block_size, self.cluster.now
        while self.imports:
            job = self.imports[0]
            need = _blocks(job.req.prompt_tokens + job.req.output_tokens, bs)
            if not self.cache.can_acquire((), need):
                return
            self.imports.popleft()
            self.cache.acquire((), need)
            job.held[self.id] = ([], need)
            start = max(now, self.link_free_s)
            self.link_free_s = start + self.costs.transfer_s(job.req.prompt_tokens)
            self.cluster.at(self.link_free_s, self._imported, job)

    def _imported(self, job: Job) -> None:
        """The pull is done: the lease is released (an RPC to the holder, awaited), then
        add_imported runs on the engine thread and the first token goes out."""
        self.cluster.prefill[job.prefill_id].release(job)
        self.cluster.at(self.cluster.now + self.costs.rpc_s, self._command, self._add_imported, job)

    def _add_imported(self, job: Job) -> None:
        _store_computed(self.cache, self.id, job)
        job.first_token_s = self.cluster.now
        self._join(job)

    def _join(self, job: Job) -> None:
        """job's first token is out: it decodes from the next step on (or is done)."""
        if job.req.output_tokens <= 1:
            self._finish(job)
        else:
            self.joining.append([job, job.req.output_tokens - 1, job.req.prompt_tokens + 1])

    def _finish(self, job: Job) -> None:
        self.cache.release(*job.held.pop(self.id))
        self.cluster.finished(job)
        self._reserve_imports()

    # -- steps ------------------------------------------------------------------------------------

    def _cut(self) -> None:
        """Ends the run in flight after its current step (no-op when idle or already so)."""
        if self._run is None:
            return
        steps, first, growth, local = self._run
        if local is not None or steps <= 1:
            return
        done = _steps_within(self.host.work_done(self.id), first, growth)
        if done + 1 < steps:
            self._run = (done + 1, first, growth, None)
            self.host.resize(self.id, _run_s(done + 1, first, growth))

    def _next_run(self) -> None:
        if self._run is not None:
            return
        costs = self.costs
        while self.joining and len(self.running) < costs.max_batch:
            self.running.append(self.joining.popleft())
        batch = len(self.running)
        context = sum(s[2] for s in self.running)
        decode_s = costs.decode_step_s(batch, context) if batch else 0.0
        waiting_prompts = len(self.local)
        local = self._admit_local() if batch < costs.max_batch else None
        # Prompts first (engine/scheduler.py, by cost): the prompt computed alone while the running
        # sequences wait a step.
        alone = (local is not None and batch > 0 and self._prompt_only_steps < MAX_PROMPT_ONLY_STEPS
                 and costs.prompts_first_pays(waiting_prompts))
        self._prompt_only_steps = self._prompt_only_steps + 1 if alone else 0
        uncached = local.req.prompt_tokens - local.cached_tokens if local is not None else 0
        if alone:
            self._schedule(1, costs.prefill_s(uncached, local.cached_tokens), 0.0, local, decodes=False)
        elif local is not None:
            # One mixed step: the prompt's tokens plus one token of every running sequence. The
            # engine runs them as one forward pass, so the step's fixed cost (reading the weights,
            # the LM head) is paid once: the decode step's when sequences are running.
            mixed = [(uncached, local.cached_tokens)] + [(1, s[2]) for s in self.running]
            fixed_s = decode_s if batch else costs.prefill_fixed_s()
            step_s = fixed_s + costs.prefill_tokens_s(uncached) + costs.attention_s(mixed)
            self._schedule(1, step_s, 0.0, local)
        elif batch:
            steps = min(s[1] for s in self.running)
            self._schedule(steps, decode_s, costs.decode_growth_s(batch), None)

    def _admit_local(self) -> Job | None:
        if not self.local:
            return None
        job = self.local[0]
        if not _lease(self.cache, self.id, job, self.cluster.block_size, job.req.prompt_tokens + job.req.output_tokens):
            return None
        return self.local.popleft()

    def _schedule(self, steps: int, first: float, growth: float, local: Job | None, decodes: bool = True) -> None:
        """Plans a run of `steps` steps; `decodes`: whether the running sequences advance in it."""
        self._run = (steps, first, growth, local)
        self._run_decodes = decodes
        self._run_start = self.cluster.now
        self.host.start(self.id, _run_s(steps, first, growth), self._end_run)

    def _end_run(self) -> None:
        """Between two steps: sequences advance or finish, a local prompt's first token goes out,
        the commands that waited run, then the next run is planned."""
        steps, _, _, local = self._run
        self._run = None
        self.busy_s += self.cluster.now - self._run_start
        if self._run_decodes:
            still = []
            for s in self.running:
                s[1] -= steps
                s[2] += steps
                if s[1] > 0:
                    still.append(s)
                else:
                    self._finish(s[0])
            self.running = still
        if local is not None:
            _store_computed(self.cache, self.id, local)
            local.first_token_s = self.cluster.now
            self._join(local)
        commands, self._commands = self._commands, []
        for fn, args in commands:
            fn(*args)
        self._next_run()


def _run_s(steps: int, first: float, growth: float) -> float:
    """Time of `steps` decode steps, the k-th (0-based) costing first + k * growth."""
    return steps * first + growth * steps * (steps - 1) / 2


def _steps_within(elapsed: float, first: float, growth: float) -> int:
    """Whole steps finished within elapsed seconds of a run's start."""
    if growth <= 0:
        return int(elapsed // first)
    a, b = growth / 2, first - growth / 2
    k = int((-b + math.sqrt(b * b + 4 * a * elapsed)) / (2 * a))
    while k > 0 and _run_s(k, first, growth) > elapsed:
        k -= 1
    while _run_s(k + 1, first, growth) <= elapsed:
        k += 1
    return k
