"""The paged KV pool: one tensor the model writes into and kvtransfer/ ships blocks of."""

import torch

from engine.config import CacheConfig, ModelConfig


def kv_pool_shape(model_cfg: ModelConfig, cache_cfg: CacheConfig) -> tuple[int, ...]:
    return (cache_cfg.num_blocks, model_cfg.num_layers, 2, cache_cfg.block_size, model_cfg.num_kv_heads,
            model_cfg.head_dim)


def allocate_kv_pool(model_cfg: ModelConfig, cache_cfg: CacheConfig, device: str = "cpu") -> torch.Tensor:
    """float32 zeros [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].

    Contiguous, block-major: a block's K and V for every layer are one contiguous byte range
    (`block_bytes(...)` long), so a block moves between processes as one copy. The whole pool is
    registered with the transfer agent once, so it is never reallocated.
    """
    return torch.zeros(kv_pool_shape(model_cfg, cache_cfg), dtype=torch.float32, device=device)


def block_bytes(model_cfg: ModelConfig, cache_cfg: CacheConfig) -> int:
    return cache_cfg.block_size * model_cfg.kv_bytes_per_token
