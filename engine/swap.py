"""The host-memory tier preempted sequences are swapped to, so they resume with bit-identical KV.

Swapping out copies the blocks covering a sequence's computed tokens into host memory (pinned
when the pool is on a GPU) and lets the engine free them; swapping in copies them into fresh
blocks. The tier holds at most `capacity_blocks` blocks: when full, swap_out answers False and
the scheduler drops the sequence to be recomputed instead.
"""

import torch

from engine.sequence import Sequence


class HostSwapTier:
    def __init__(self, kv_cache: torch.Tensor, capacity_blocks: int):
        self._kv_cache = kv_cache
        self.capacity_blocks = capacity_blocks
        self._swapped: dict[str, tuple[torch.Tensor, list[int], int]] = {}  # id -> (blocks, hashes, computed)
        self.num_swaps_out = 0

    @property
    def num_used_blocks(self) -> int:
        return sum(blocks.shape[0] for blocks, _, _ in self._swapped.values())

    def holds(self, seq: Sequence) -> bool:
        return seq.request_id in self._swapped

    def swap_out(self, seq: Sequence, block_size: int) -> bool:
        """Copies seq's computed blocks to host memory (seq keeps its block table: the caller
        frees it). False, copying nothing, when the tier has no room."""
        n = -(-seq.num_computed_tokens // block_size)
        if n == 0 or self.num_used_blocks + n > self.capacity_blocks:
            return False
        index = torch.tensor(seq.block_table[:n], dtype=torch.long, device=self._kv_cache.device)
        host = self._kv_cache.index_select(0, index).to("cpu", non_blocking=False)
        if self._kv_cache.device.type != "cpu":
            host = host.pin_memory()
        self._swapped[seq.request_id] = (host, list(seq.block_hashes), seq.num_computed_tokens)
        self.num_swaps_out += 1
        return True

    def swap_in(self, seq: Sequence, block_table: list[int]) -> None:
        """Writes seq's swapped blocks into the first blocks of block_table (fresh blocks the
        caller allocated for all its tokens) and restores its computed state."""
        host, hashes, computed = self._swapped.pop(seq.request_id)
        index = torch.tensor(block_table[:host.shape[0]], dtype=torch.long, device=self._kv_cache.device)
        self._kv_cache.index_copy_(0, index, host.to(self._kv_cache.device))
        seq.block_table, seq.block_hashes, seq.num_computed_tokens = block_table, hashes, computed

    def discard(self, seq: Sequence) -> None:
        """Forgets seq's swapped blocks (it was aborted while swapped out)."""
        self._swapped.pop(seq.request_id, None)
