"""A small Llama-style decoder with gated attention (Qwen3-Next style G1 gate) and SwiGLU.

Hand-written in plain PyTorch the way model code is written: RMSNorm, RoPE, GQA through
``repeat_kv``, a causal mask from ``arange`` comparisons, fp32-upcast softmax, a sigmoid output
gate taken from extra ``q_proj`` columns, and a SwiGLU MLP. Built from a config; nothing downloaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 512
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 344
    gated_attention: bool = True
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, t, d = x.shape
    if n == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.h, self.kvh = cfg.heads, cfg.kv_heads
        self.d = cfg.hidden // cfg.heads
        self.gated = cfg.gated_attention
        q_out = self.h * self.d * (2 if self.gated else 1)
        self.q_proj = nn.Linear(cfg.hidden, q_out, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, self.kvh * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, self.kvh * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        if self.gated:
            q, gate = torch.chunk(self.q_proj(x).view(b, t, self.h, 2 * self.d), 2, dim=-1)
            gate = gate.reshape(b, t, -1)
        else:
            q = self.q_proj(x).view(b, t, self.h, self.d)
        q = q.transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, self.h // self.kvh), repeat_kv(v, self.h // self.kvh)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.d) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(probs, v).transpose(1, 2).contiguous().reshape(b, t, -1)
        if self.gated:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o)


class SwiGLU(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.hidden), RMSNorm(cfg.hidden)
        self.attn, self.mlp = Attention(cfg), SwiGLU(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        d = cfg.hidden // cfg.heads
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, ids):
        b, t = ids.shape
        x = self.embed(ids)
        pos = torch.arange(t, device=ids.device)
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = torch.where(pos[None, :] <= pos[:, None], 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        return self.lm_head(self.norm(x))
