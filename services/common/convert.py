"""Proto <-> domain conversions shared by the services (pure functions, no I/O)."""

import math

from engine.sampling import SamplingParams
from pdmesh.v1 import common_pb2
from services.common.errors import InvalidArgument

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    temperature = p.temperature if p.HasField("temperature") else 0.0
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if math.isnan(temperature) or math.isinf(temperature) or temperature < 0:
        raise InvalidArgument(f"sampling.temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {top_p}")
    return SamplingParams(temperature=temperature, top_p=top_p, seed=p.seed if p.HasField("seed") else None)


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p)
    if s.seed is not None:
        p.seed = s.seed
    return p


def check_token_ids(token_ids, vocab_size: int, max_prompt_tokens: int) -> list[int]:
    ids = list(token_ids)
    if not ids:
        raise InvalidArgument("prompt is empty: send text or at least one token id")
    if len(ids) > max_prompt_tokens:
        raise InvalidArgument(f"prompt has {len(ids)} tokens; the limit is {max_prompt_tokens} "
                              f"(context length minus at least one generated token)")
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise InvalidArgument(f"unknown token ids {bad[:5]}{'...' if len(bad) > 5 else ''}: "
                              f"ids must be below the vocabulary size {vocab_size}")
    return ids


def check_max_tokens(max_tokens: int, cap: int) -> int:
    if max_tokens <= 0:
        raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens > cap:
        raise InvalidArgument(f"max_tokens {max_tokens} is above this server's cap of {cap}")
    return max_tokens


def priority_from_proto(priority: int) -> int:
    """PriorityClass -> the engine's priority rank (lower runs first). Unknown values are rejected."""
    from engine.sequence import PRIORITY_BATCH, PRIORITY_INTERACTIVE
    ranks = {common_pb2.PRIORITY_CLASS_UNSPECIFIED: PRIORITY_INTERACTIVE,
             common_pb2.PRIORITY_CLASS_INTERACTIVE: PRIORITY_INTERACTIVE, common_pb2.PRIORITY_CLASS_BATCH: PRIORITY_BATCH}
    if priority not in ranks:
        raise InvalidArgument(f"unknown priority class {priority}; use PRIORITY_CLASS_INTERACTIVE or PRIORITY_CLASS_BATCH")
    return ranks[priority]
