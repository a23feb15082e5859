"""Generate text with FP4 attention (attnqat mode "fp4") from a Hugging Face causal LM.

    python examples/serve_fp4.py --model-dir runs/qat --prompt "The "      # a model saved by finetune_qat.py
    python examples/serve_fp4.py --compare                                  # a small random Llama; vs BF16
    python examples/serve_fp4.py --fp4-cache                                # K, V in the paged FP4 cache

Byte-level tokens (token = byte), as examples/finetune_qat.py trains; nothing is downloaded.
Generation uses transformers' KV cache: the prompt (prefill) runs causal FP4 attention, each new
token one query over the cache (bottom-right causal: it sees every cached key). Several prompts
(``--prompt`` repeated) form a left-padded batch. --compare also generates with transformers'
SDPA (BF16) attention and reports how many generated tokens agree.

--fp4-cache keeps K and V in :class:`attnqat.hf.FP4Cache` (the paged FP4 KV cache: 4.5 bits per
element instead of 16; each new token's attention runs the FP4 decode kernel over the pages; on
the CPU, the reference) and also generates with transformers' default BF16 cache, reporting the
cache bytes per token and how many tokens agree (the numerics are the same; on the CPU the tokens
are identical, on CUDA the two paths sum in different orders).
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch

import attnqat


def load(args, device, impl):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model_dir:
        return AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation=impl).to(device, dtype).eval()
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(device, dtype).eval()


def encode(prompts, device):
    """Byte-level, left-padded batch with its attention mask."""
    seqs = [list(p.encode("utf-8")) for p in prompts]
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[0] * (n - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def generate(model, ids, mask, args, cache=None):
    kw = {}
    if cache is not None:  # transformers 5.2x renamed generate's past_key_values to cache
        kw["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = cache
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=0, **kw)
    return out[:, ids.shape[1]:], time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="a local Hugging Face checkpoint (default: a small random Llama)")
    p.add_argument("--prompt", action="append", help="repeat for a batch (default: two prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--p-quant", choices=["paper", "anchored"], default="anchored")
    p.add_argument("--compare", action="store_true", help="also generate with BF16 SDPA attention")
    p.add_argument("--fp4-cache", action="store_true", help="keep K, V in attnqat.hf.FP4Cache (paged FP4 pages)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    prompts = args.prompt or ["The quick brown fox ", "Attention is "]

    attnqat.hf.register()
    device = torch.device(args.device)
    model = load(args, device, "attnqat")
    ids, mask = encode(prompts, device)
    with attnqat.config(mode="fp4", p_quant=args.p_quant):
        new, seconds = generate(model, ids, mask, args)
    n_tokens = new.numel()
    print(f"fp4 attention: {n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s, batch {len(prompts)})")
    for prompt, row in zip(prompts, new.tolist()):
        print(f"  {prompt!r} -> {bytes(row).decode('utf-8', errors='replace')!r}")
    if args.fp4_cache:
        cache = attnqat.hf.FP4Cache(model, max_cache_len=ids.shape[1] + args.max_new_tokens, page_size=args.page_size)
        with attnqat.config(mode="fp4", p_quant=args.p_quant):
            cached, c_seconds = generate(model, ids, mask, args, cache)
        cfg = model.config
        bf16_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cache.head_dim * 2
        agree = (cached == new).float().mean().item()
        print(f"fp4 attention + FP4 KV cache: {c_seconds:.2f} s; cache {cache.bytes_per_token} bytes per token "
              f"(bf16 cache: {bf16_bytes}); tokens equal to the bf16-cache run: {100 * agree:.1f}%")
    if args.compare:
        ref = load(args, device, "sdpa")
        ref.load_state_dict(model.state_dict())
        ref_new, ref_seconds = generate(ref, ids, mask, args)
        agree = (ref_new == new).float().mean().item()
        first = [(row != ref_row).nonzero()[:1].flatten().tolist() for row, ref_row in zip(new, ref_new)]
        print(f"bf16 sdpa: {ref_seconds:.2f} s; generated tokens equal to fp4's: {100 * agree:.1f}% "
              f"(first difference per prompt: {[f[0] if f else None for f in first]})")


if __name__ == "__main__":
    main()
