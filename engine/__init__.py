"""The model runtime shared by prefill and decode workers: Gemma-3 in plain PyTorch, a paged KV
cache with prefix caching, a block manager, a continuous-batching scheduler and sampling."""
