"""What one forward pass needs to know about the paged KV cache.

The KV pool is one tensor of shape [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
(2 = keys, values). Each block holds its tokens' K and V for *all* layers contiguously, so moving a
block between processes is one contiguous copy (see kvtransfer/).

A pass covers a batch of sequences; their new tokens are flattened in order (sequence 0's new
tokens, then sequence 1's, ...). Sequence i already has context_lens[i] - query_lens[i] tokens in
the cache (a cached prefix or earlier steps) and adds query_lens[i] new ones at positions
context_lens[i] - query_lens[i] .. context_lens[i] - 1. The model writes the new tokens' K/V into
(slot_blocks[t], slot_offsets[t]) before attending, so block_tables[i] must already cover
context_lens[i] tokens.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_blocks: torch.Tensor  # int64 [num_new_tokens]
    slot_offsets: torch.Tensor  # int64 [num_new_tokens]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int) -> "AttentionMetadata":
        positions = positions_of(query_lens, context_lens)
        slots_block, slots_offset = [], []
        for table, seq_positions in zip(block_tables, _split(positions, query_lens)):
            slots_block += [table[p // block_size] for p in seq_positions]
            slots_offset += [p % block_size for p in seq_positions]
        return cls(list(query_lens), list(context_lens), [list(t) for t in block_tables],
                   torch.tensor(slots_block, dtype=torch.long), torch.tensor(slots_offset, dtype=torch.long))

    @property
    def num_new_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self) -> torch.Tensor:
        return torch.tensor(positions_of(self.query_lens, self.context_lens), dtype=torch.long)

    def last_token_indices(self) -> torch.Tensor:
        """Row of each sequence's last new token in the flattened batch (where logits are taken)."""
        ends, total = [], 0
        for n in self.query_lens:
            total += n
            ends.append(total - 1)
        return torch.tensor(ends, dtype=torch.long)


def positions_of(query_lens: list[int], context_lens: list[int]) -> list[int]:
    return [p for q, c in zip(query_lens, context_lens) for p in range(c - q, c)]


def _split(values: list[int], lens: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in lens:
        out.append(values[start:start + n])
        start += n
    return out
