"""What the engine does around Scheduler.schedule(), for scheduler tests without a model."""


def finish_step(batch):
    """Advance every scheduled sequence and give each fully computed one a token."""
    for seq, n in zip(batch.seqs, batch.query_lens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)


def run_steps(scheduler, n: int) -> list[list[tuple[str, int]]]:
    """n steps scheduled and finished: per step, (request id, tokens computed) in batch order."""
    steps = []
    for _ in range(n):
        batch = scheduler.schedule()
        steps.append([(q.request_id, k) for q, k in zip(batch.seqs, batch.query_lens)])
        finish_step(batch)
    return steps
