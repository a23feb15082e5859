"""Generate text with a small randomly initialised decoder and the paged FP4 KV cache.

A standalone decoder loop (no Hugging Face): a byte-level GPT-style model (RMSNorm, rotary
embeddings, GQA attention with head dim 128, SwiGLU MLP) whose attention runs in attnqat's
``fp4`` mode. The prompt is prefilled with ``attnqat.attention(mode="fp4", causal=True)`` and its
K, V are quantized straight into the pages of an :class:`attnqat.FP4KVCache`; every generated token
then appends its K, V (one token per sequence) and attends over the cache with the decode kernel.
Several prompts of different lengths are served as one batch.

The weights are random, so the text is noise; what the example shows is the serving loop, the
cache's memory (bytes per token against BF16) and that decoding from the cache reproduces the
full-sequence ``fp4`` forward (the last step is recomputed without the cache and compared).

    python examples/serve_fp4_cache.py [--device cuda] [--tokens 32] [--page-size 64]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import attnqat


class Config:
    vocab = 256
    layers = 2
    d_model = 512
    heads = 4
    kv_heads = 2
    head_dim = 128
    ffn = 1024


def rope(x, pos):
    """Rotary embedding of x [B, H, N, D] at integer positions pos [B, N]."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos[:, None, :, None].float() * inv  # [B, 1, N, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., ::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class Model(torch.nn.Module):
    def __init__(self, cfg: Config, dtype):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(0)
        w = lambda *s: torch.nn.Parameter((torch.randn(*s, generator=g) / math.sqrt(s[-1])).to(dtype))  # noqa: E731
        self.embed = w(cfg.vocab, cfg.d_model)
        self.wq = torch.nn.ParameterList([w(cfg.heads * cfg.head_dim, cfg.d_model) for _ in range(cfg.layers)])
        self.wk = torch.nn.ParameterList([w(cfg.kv_heads * cfg.head_dim, cfg.d_model) for _ in range(cfg.layers)])
        self.wv = torch.nn.ParameterList([w(cfg.kv_heads * cfg.head_dim, cfg.d_model) for _ in range(cfg.layers)])
        self.wo = torch.nn.ParameterList([w(cfg.d_model, cfg.heads * cfg.head_dim) for _ in range(cfg.layers)])
        self.w1 = torch.nn.ParameterList([w(cfg.ffn, cfg.d_model) for _ in range(cfg.layers)])
        self.w3 = torch.nn.ParameterList([w(cfg.ffn, cfg.d_model) for _ in range(cfg.layers)])
        self.w2 = torch.nn.ParameterList([w(cfg.d_model, cfg.ffn) for _ in range(cfg.layers)])

    def qkv(self, layer, x, pos):
        b, n, _ = x.shape
        c = self.cfg
        h = F.rms_norm(x, (c.d_model,))
        q = (h @ self.wq[layer].T).view(b, n, c.heads, c.head_dim).transpose(1, 2)
        k = (h @ self.wk[layer].T).view(b, n, c.kv_heads, c.head_dim).transpose(1, 2)
        v = (h @ self.wv[layer].T).view(b, n, c.kv_heads, c.head_dim).transpose(1, 2)
        return rope(q, pos), rope(k, pos), v.contiguous()

    def finish(self, layer, x, attn):
        b, _, n, _ = attn.shape
        x = x + attn.transpose(1, 2).reshape(b, n, -1) @ self.wo[layer].T
        h = F.rms_norm(x, (self.cfg.d_model,))
        return x + (F.silu(h @ self.w1[layer].T) * (h @ self.w3[layer].T)) @ self.w2[layer].T

    def logits(self, x):
        return F.rms_norm(x, (self.cfg.d_model,)) @ self.embed.T

    @torch.no_grad()
    def forward_full(self, tokens):
        """The whole sequence at once, fp4 attention without a cache: the check's reference."""
        b, n = tokens.shape
        pos = torch.arange(n, device=tokens.device)[None].expand(b, n)
        x = self.embed[tokens]
        for layer in range(self.cfg.layers):
            q, k, v = self.qkv(layer, x, pos)
            x = self.finish(layer, x, attnqat.attention(q, k, v, mode="fp4", causal=True, p_quant="anchored"))
        return self.logits(x)


@torch.no_grad()
def generate(model, prompts, cache, new_tokens, temperature):
    cfg = model.cfg
    device = cache.device
    seqs = [cache.new_sequence() for _ in prompts]
    outputs = [list(p) for p in prompts]
    # Prefill each prompt (different lengths): causal fp4 attention, K and V into the cache.
    last = []
    for sid, toks in zip(seqs, prompts):
        t = torch.tensor([toks], device=device)
        pos = torch.arange(len(toks), device=device)[None]
        x = model.embed[t]
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, pos)
            cache.append([sid], k, v, layer=layer)
            x = model.finish(layer, x, attnqat.attention(q, k, v, mode="fp4", causal=True, p_quant="anchored"))
        last.append(model.logits(x)[:, -1])
    logits = torch.cat(last)
    # Decode: one token per sequence per step, the whole batch at once.
    for _ in range(new_tokens):
        probs = torch.softmax(logits.float() / temperature, -1)
        nxt = torch.multinomial(probs, 1)[:, 0] if temperature > 0 else logits.argmax(-1)
        for o, t in zip(outputs, nxt.tolist()):
            o.append(t)
        pos = torch.tensor([[cache.length(s)] for s in seqs], device=device)
        x = model.embed[nxt][:, None]
        for layer in range(cfg.layers):
            q, k, v = model.qkv(layer, x, pos)
            cache.append(seqs, k, v, layer=layer)
            x = model.finish(layer, x, cache.attend(q, seqs, layer=layer, p_quant="anchored"))
        logits = model.logits(x)[:, -1]
    return seqs, outputs, logits


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not attnqat.build_info()["cuda"]:
        raise SystemExit("this build of attnqat has no CUDA kernels; run with --device cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = Config()
    model = Model(cfg, dtype).to(device)
    prompts = [list(b"FP4 attention on Hopper"), list(b"Hello"), list(b"A paged KV cache holds 3.5x more tokens")]
    max_len = max(len(x) for x in prompts) + args.tokens
    pages = len(prompts) * -(-max_len // args.page_size)
    cache = attnqat.FP4KVCache(pages, args.page_size, cfg.kv_heads, cfg.head_dim, device, num_layers=cfg.layers)
    t0 = time.perf_counter()
    seqs, outputs, logits = generate(model, prompts, cache, args.tokens, args.temperature)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for o in outputs:
        print(repr(bytes(o).decode("latin-1")))
    bf16_bytes = cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * 2
    print(f"{len(prompts)} sequences, {args.tokens} new tokens each in {dt:.2f} s on {device}; "
          f"cache {cache.bytes_per_token} bytes/token vs {bf16_bytes} in bf16 ({bf16_bytes / cache.bytes_per_token:.2f}x)")
    # Check: the cached decode's last logits (after feeding every generated token) against the
    # full-sequence fp4 forward over the same tokens.
    worst = 0.0
    for i, o in enumerate(outputs):
        ref = model.forward_full(torch.tensor([o], device=device))[:, -1]
        worst = max(worst, float((ref.float() - logits[i:i + 1].float()).norm() / ref.float().norm()))
    print(f"cached decode vs full fp4 forward, last logits: relative error {worst:.2e}")


if __name__ == "__main__":
    main()
