"""Gemma-3 text model in plain PyTorch over a paged KV cache.

A pass takes the flattened new tokens of a batch of sequences (see AttentionMetadata), writes each
layer's new K/V into the pool at the tokens' slots, then attends over each sequence's context read
back through its block table. Sliding-window layers gather only the blocks that can hold a key
within the window of some new token; global layers gather the whole context. Sequences are padded
to a common number of blocks and masked, so a pass is a fixed number of batched ops per layer
whatever the batch looks like.

Architecture (Gemma 3): embeddings scaled by sqrt(hidden); per layer RMSNorm -> attention
(q/k RMSNorm per head, rotate-half RoPE with theta 1e6 on global layers and 1e4 on sliding ones,
scale query_pre_attn_scalar**-0.5, one KV head shared by all query heads) -> RMSNorm -> residual;
RMSNorm -> GeGLU MLP (tanh gelu) -> RMSNorm -> residual; final RMSNorm; LM head tied to the
embeddings. Norm weights are stored pre-offset (x * w, not x * (1 + w)); see engine/weights.py.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.errors import StepInterrupted


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(NamedTuple):
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, head_dim: int, theta: float) -> "Rope":
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return cls(angles.cos(), angles.sin())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cos + rotate_half(x) * self.sin


class ContextView(NamedTuple):
    """How one kind of layer (global or sliding) reads the pool in a pass, shared by its layers."""

    block_ids: torch.Tensor  # int64 [B, num_blocks]: blocks to gather per sequence (padded)
    mask: torch.Tensor  # bool [B, 1, num_heads * max_query_len, num_blocks * block_size]


class PassPlan(NamedTuple):
    """Everything a pass derives from AttentionMetadata once, before the layers run."""

    query_rows: torch.Tensor  # int64 [B, max_query_len]: row of each padded query in the flat batch
    query_valid: torch.Tensor  # bool [B, max_query_len]
    global_view: ContextView
    sliding_view: ContextView
    rope_global: Rope
    rope_sliding: Rope


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config = config
        self.layer = layer
        self.is_global = config.is_global_layer(layer)
        h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
        q_size, kv_size = config.num_heads * d, config.num_kv_heads * d
        self.qkv_proj = nn.Parameter(torch.empty(q_size + 2 * kv_size, h), requires_grad=False)
        self.o_proj = nn.Parameter(torch.empty(h, q_size), requires_grad=False)
        self.gate_up_proj = nn.Parameter(torch.empty(2 * i, h), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(h, i), requires_grad=False)
        for name, size in [("q_norm", d), ("k_norm", d), ("input_norm", h), ("post_attn_norm", h),
                           ("pre_ffn_norm", h), ("post_ffn_norm", h)]:
            self.register_parameter(name, nn.Parameter(torch.ones(size), requires_grad=False))

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                plan: PassPlan) -> torch.Tensor:
        q, k, v = self._qkv(rms_norm(x, self.input_norm, self.config.rms_norm_eps),
                            plan.rope_global if self.is_global else plan.rope_sliding)
        kv_cache[meta.slot_blocks, self.layer, 0, meta.slot_offsets] = k
        kv_cache[meta.slot_blocks, self.layer, 1, meta.slot_offsets] = v
        view = plan.global_view if self.is_global else plan.sliding_view
        attn = self._paged_attention(q, kv_cache, view, plan)
        x = x + rms_norm(F.linear(attn, self.o_proj), self.post_attn_norm, self.config.rms_norm_eps)
        return x + rms_norm(self._mlp(rms_norm(x, self.pre_ffn_norm, self.config.rms_norm_eps)),
                            self.post_ffn_norm, self.config.rms_norm_eps)

    def _qkv(self, h: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = F.linear(h, self.qkv_proj).split([q_size, kv_size, kv_size], dim=-1)
        q = rope.apply(rms_norm(q.view(-1, cfg.num_heads, cfg.head_dim), self.q_norm, cfg.rms_norm_eps))
        k = rope.apply(rms_norm(k.view(-1, cfg.num_kv_heads, cfg.head_dim), self.k_norm, cfg.rms_norm_eps))
        return q, k, v.view(-1, cfg.num_kv_heads, cfg.head_dim)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(h, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj)

    def _paged_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, view: ContextView,
                         plan: PassPlan) -> torch.Tensor:
        """q [T, num_heads, D] -> [T, num_heads * D]. All query heads of a sequence share its KV
        heads, so they are folded into the query-length axis: one [Hq*Q, K] score matrix per
        (sequence, KV head)."""
        cfg = self.config
        batch, max_query_len = plan.query_rows.shape
        group = cfg.num_heads // cfg.num_kv_heads
        # [B, NB, bs, Hkv, D] -> [B, Hkv, NB * bs, D]: a view, no copy, when Hkv == 1.
        keys, values = (kv_cache[view.block_ids, self.layer, kind].flatten(1, 2).transpose(1, 2) for kind in (0, 1))
        # [B, Q, Hkv, group, D] -> [B, Hkv, group * Q, D]
        padded_q = q[plan.query_rows].view(batch, max_query_len, cfg.num_kv_heads, group, cfg.head_dim)
        padded_q = padded_q.permute(0, 2, 3, 1, 4).reshape(batch, cfg.num_kv_heads, group * max_query_len, -1)
        out = F.scaled_dot_product_attention(padded_q, keys, values, attn_mask=view.mask,
                                             scale=cfg.query_pre_attn_scalar ** -0.5)
        out = out.view(batch, cfg.num_kv_heads, group, max_query_len, cfg.head_dim).permute(0, 3, 1, 2, 4)
        return out[plan.query_valid].reshape(-1, cfg.num_heads * cfg.head_dim)


class Gemma3ForCausalLM(nn.Module):
    """`lm_head_dtype` bfloat16 (or float16) halves the bytes the LM head reads per step (its
    262k x 640 matrix is the largest read of a decode step) and runs on AMX/AVX512-BF16 units.
    Rounding moves logits by up to ~0.12 (bf16; ~0.015 fp16), enough to flip near-ties, so
    compute_logits recomputes each row's top candidates exactly (see there). float32 uses the
    tied embeddings as they are."""

    EXACT_TOP_K = 32

    def __init__(self, config: ModelConfig, lm_head_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.lm_head_dtype = lm_head_dtype
        self.register_buffer("lm_head", None, persistent=False)  # set by load_state_dict_unfused
        self.embed_tokens = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size), requires_grad=False)
        self.final_norm = nn.Parameter(torch.ones(config.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))

    def load_state_dict_unfused(self, state: dict[str, torch.Tensor]) -> None:
        """Load the checkpoint's per-projection tensors (engine/weights.py names), fusing q/k/v and
        gate/up so each layer runs two input matmuls instead of five."""
        fused = {"embed_tokens": state["embed_tokens"], "final_norm": state["final_norm"]}
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            fused[p + "qkv_proj"] = torch.cat([state[p + "q_proj"], state[p + "k_proj"], state[p + "v_proj"]])
            fused[p + "gate_up_proj"] = torch.cat([state[p + "gate_proj"], state[p + "up_proj"]])
            for name in ("o_proj", "down_proj", "q_norm", "k_norm", "input_norm", "post_attn_norm",
                         "pre_ffn_norm", "post_ffn_norm"):
                fused[p + name] = state[p + name]
        self.load_state_dict(fused, strict=True, assign=True)
        self.lm_head = self.embed_tokens.detach().to(self.lm_head_dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, interrupt: Callable[[], bool] | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of the new tokens after the final norm; writes their K/V.
        `interrupt()` is asked before each layer: True raises StepInterrupted (the K/V written so
        far lies past every sequence's computed tokens; it is overwritten when they are computed)."""
        plan = self._plan(positions, meta, block_size=kv_cache.shape[3])
        x = self._embed(input_ids)
        for layer in self.layers:
            if interrupt is not None and interrupt():
                raise StepInterrupted("a more urgent request arrived")
            x = layer(x, kv_cache, meta, plan)
        return rms_norm(x, self.final_norm, self.config.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for the rows given (pass only the rows you sample from).

        With a reduced-precision LM head, each row's top EXACT_TOP_K logits are recomputed in
        float32, so greedy picks (and the head of the distribution) equal the float32 model's;
        the rest are within ~0.12 (bf16) of float32. A float32 top-k pick could only be missed if
        the rounding error exceeded the gap between a row's 1st and 32nd logit."""
        if self.lm_head_dtype == torch.float32:
            return F.linear(hidden, self.lm_head)
        logits = F.linear(hidden.to(self.lm_head_dtype), self.lm_head).float()
        top = logits.topk(self.EXACT_TOP_K, dim=-1).indices  # [N, k]
        exact = torch.einsum("nd,nkd->nk", hidden, self.embed_tokens[top])
        return logits.scatter_(1, top, exact)

    def compute_exact_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Like compute_logits, but always through the float32 tied embeddings."""
        return F.linear(hidden, self.embed_tokens)

    def reference_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] of one sequence from position 0, unpaged: plain causal attention with
        the sliding window as a mask. Slow and simple; tests compare the paged path against it."""
        cfg = self.config
        positions = torch.arange(len(input_ids))
        distance = positions[:, None] - positions[None, :]
        causal = distance >= 0
        masks = {True: causal, False: causal & (distance < cfg.sliding_window)}
        ropes = {True: Rope.at(positions, cfg.head_dim, cfg.rope_theta_global),
                 False: Rope.at(positions, cfg.head_dim, cfg.rope_theta_local)}
        x = self._embed(input_ids)
        group = cfg.num_heads // cfg.num_kv_heads
        for layer in self.layers:
            q, k, v = layer._qkv(rms_norm(x, layer.input_norm, cfg.rms_norm_eps), ropes[layer.is_global])
            k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
            attn = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=masks[layer.is_global],
                                                  scale=cfg.query_pre_attn_scalar ** -0.5)
            attn = attn.transpose(0, 1).reshape(len(input_ids), -1)
            x = x + rms_norm(F.linear(attn, layer.o_proj), layer.post_attn_norm, cfg.rms_norm_eps)
            x = x + rms_norm(layer._mlp(rms_norm(x, layer.pre_ffn_norm, cfg.rms_norm_eps)),
                             layer.post_ffn_norm, cfg.rms_norm_eps)
        return self.compute_logits(rms_norm(x, self.final_norm, cfg.rms_norm_eps))

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[input_ids] * (self.config.hidden_size ** 0.5)

    def _plan(self, positions: torch.Tensor, meta: AttentionMetadata, block_size: int) -> PassPlan:
        cfg = self.config
        max_query_len = max(meta.query_lens)
        starts = torch.tensor([0] + meta.query_lens[:-1]).cumsum(0)
        offsets = torch.arange(max_query_len)
        query_lens = torch.tensor(meta.query_lens)
        query_valid = offsets[None, :] < query_lens[:, None]
        # Padded queries point at their sequence's first row; their output is dropped.
        query_rows = starts[:, None] + torch.where(query_valid, offsets[None, :], 0)
        context_lens = torch.tensor(meta.context_lens)
        query_pos = (context_lens - query_lens)[:, None] + offsets[None, :]  # [B, Q]
        return PassPlan(query_rows, query_valid,
                        self._context_view(meta, query_pos, query_valid, block_size, window=None),
                        self._context_view(meta, query_pos, query_valid, block_size, window=cfg.sliding_window),
                        Rope.at(positions, cfg.head_dim, cfg.rope_theta_global),
                        Rope.at(positions, cfg.head_dim, cfg.rope_theta_local))

    def _context_view(self, meta: AttentionMetadata, query_pos: torch.Tensor, query_valid: torch.Tensor,
                      block_size: int, window: int | None) -> ContextView:
        first_blocks, tables = [], []
        for table, query_len, context_len in zip(meta.block_tables, meta.query_lens, meta.context_lens):
            first_key = 0 if window is None else max(0, context_len - query_len - window + 1)
            first_block = first_key // block_size
            first_blocks.append(first_block)
            tables.append(table[first_block:-(-context_len // block_size)])
        num_blocks = max(len(t) for t in tables)
        block_ids = torch.tensor([t + [t[0]] * (num_blocks - len(t)) for t in tables], dtype=torch.long)
        key_pos = (torch.tensor(first_blocks)[:, None] * block_size
                   + torch.arange(num_blocks * block_size)[None, :])  # [B, K]
        distance = query_pos[:, :, None] - key_pos[:, None, :]  # [B, Q, K]
        visible = (distance >= 0) & (key_pos < torch.tensor(meta.context_lens)[:, None])[:, None, :]
        if window is not None:
            visible &= distance < window
        # Padded query rows see one key so softmax stays finite; their output is dropped.
        visible |= ~query_valid[:, :, None] & (torch.arange(visible.shape[-1]) == 0)
        group = self.config.num_heads // self.config.num_kv_heads
        mask = visible[:, None].expand(-1, group, -1, -1).reshape(len(tables), 1, -1, visible.shape[-1])
        return ContextView(block_ids, mask)
