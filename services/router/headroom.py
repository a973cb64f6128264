"""When may batch work take a slot? Only while the pools report headroom.

Rule (all from the workers' load reports, plus what this router placed since the last report):
- some healthy decode worker has at most `max_waiting` sequences waiting (default 0: nothing
  queued in its engine), KV blocks used / total below `max_kv_utilization`, and fewer
  sequences running or placed there by this router (LoadView.queue_depth: a slot freed since
  the last report counts as free at once) than `max_running_per_worker`, by default (0) the
  worker's own limit from its load report (its max_num_seqs; 8 if it reports none): batch keeps
  every slot busy, and the workers preempt it for live requests (engine/scheduler.py); and
- when a prefill pool is up, some healthy prefill worker has at most `max_prefill_queue_tokens`
  prompt tokens queued or in flight (a batch prompt must not sit in front of a live one).
Interactive requests never consult this: they dispatch at once.
"""

from dataclasses import dataclass

from services.router.placement.base import WorkerView

UNREPORTED_MAX_RUNNING = 8  # batch sequences per worker when its load report does not say its limit


@dataclass(frozen=True)
class HeadroomRule:
    max_kv_utilization: float = 0.8
    max_waiting: int = 0
    max_running_per_worker: int = 0  # 0: the worker's reported max_running
    max_prefill_queue_tokens: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.max_kv_utilization <= 1 or self.max_waiting < 0 or self.max_running_per_worker < 0 \
                or self.max_prefill_queue_tokens < 0:
            raise ValueError("batch headroom: kv utilization in (0, 1], max_waiting >= 0, "
                             "max_running_per_worker >= 0, max_prefill_queue_tokens >= 0")

    def decode_has_room(self, worker: WorkerView) -> bool:
        load = worker.load
        kv = load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
        return (worker.healthy and load.waiting <= self.max_waiting and kv < self.max_kv_utilization
                and load.queue_depth < self.running_limit(load))

    def running_limit(self, load) -> int:
        return self.max_running_per_worker or load.max_running or UNREPORTED_MAX_RUNNING

    def has_room(self, workers: list[WorkerView]) -> bool:
        if not any(w.role == "decode" and self.decode_has_room(w) for w in workers):
            return False
        prefill = [w for w in workers if w.role == "prefill" and w.healthy]
        return not prefill or any(w.load.pending_prefill_tokens <= self.max_prefill_queue_tokens for w in prefill)
