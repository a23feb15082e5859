"""Switch a small Hugging Face causal LM's attention to Attn-QAT and fine-tune it on a text file.

    python examples/finetune_qat.py corpus.txt --out runs/qat                   # small Llama from a config
    python examples/finetune_qat.py corpus.txt --model-dir path/to/hf_model     # a local HF checkpoint

Nothing is downloaded: text is tokenized byte-level (token = byte, vocabulary 256), and without
--model-dir the model is a small randomly initialised Llama/Qwen2/Qwen3 built from its config
class. The run has two phases, to show the switch:

1. --bf16-steps steps with transformers' own SDPA attention (a stand-in for pre-training, skipped
   with --model-dir unless asked for),
2. ``model.set_attn_implementation("attnqat")`` and --steps steps of Attn-QAT fine-tuning
   (``attnqat.config(mode="attn_qat")``: FP4 forward, the Attn-QAT backward).

Before and after phase 2 it prints the held-out loss (the last 10% of the file) with BF16
attention and with FP4 attention (``mode="fp4"``, what serving uses); the QAT phase should shrink
the gap. The model is saved with ``save_pretrained`` to --out (load it with
``attn_implementation="attnqat"`` after ``attnqat.hf.register()``; examples/serve_fp4.py does).
On CUDA: bf16 weights, head_dim 64 by default (the sm_90 kernels support 64 and 128).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import attnqat

ARCHS = ("llama", "qwen2", "qwen3")


def build_model(args, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    if args.model_dir:
        return AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa").to(device, dtype)
    common = dict(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=max(512, args.seq), attention_dropout=0.0, bos_token_id=None,
                  eos_token_id=None, pad_token_id=0, tie_word_embeddings=True)
    cfg = {"llama": lambda: LlamaConfig(**common), "qwen2": lambda: Qwen2Config(**common),
           "qwen3": lambda: Qwen3Config(head_dim=args.hidden // args.heads, **common)}[args.arch]()
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device, dtype)


def switch_to_attnqat(model):
    """The one line of the integration (older transformers: set the config field)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("attnqat")
    else:
        model.config._attn_implementation = "attnqat"
    assert model.config._attn_implementation == "attnqat"


def windows(data: torch.Tensor, n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - seq - 1, (n,), generator=gen)
    return torch.stack([data[s:s + seq + 1] for s in start.tolist()])


@torch.no_grad()
def held_out_loss(model, data, args, device, mode=None):
    model.eval()
    gen = torch.Generator().manual_seed(123)
    x = windows(data, args.eval_batches * args.batch, args.seq, gen).to(device)
    total = 0.0
    for chunk in x.split(args.batch):
        if mode is None:  # the model's current implementation as is
            total += model(chunk, labels=chunk).loss.item()
        else:
            with attnqat.config(mode=mode, p_quant=args.p_quant):
                total += model(chunk, labels=chunk).loss.item()
    model.train()
    return total / math.ceil(len(x) / args.batch)


def train(model, data, steps, args, device, label):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + len(label))
    model.train()
    t0 = time.time()
    for step in range(steps):
        x = windows(data, args.batch, args.seq, gen).to(device)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            print(f"[{label}] step {step:4d}  loss {loss.item():.4f}  ({time.time() - t0:.1f} s)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text_file")
    p.add_argument("--model-dir", help="a local Hugging Face checkpoint (default: a small model from a config)")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bf16-steps", type=int, default=None, help="SDPA steps before the switch (default 200, 0 with --model-dir)")
    p.add_argument("--steps", type=int, default=200, help="Attn-QAT fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--p-quant", choices=["paper", "anchored"], default="anchored")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="save the fine-tuned model here (save_pretrained)")
    args = p.parse_args()
    if args.bf16_steps is None:
        args.bf16_steps = 0 if args.model_dir else 200

    attnqat.hf.register()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    raw = open(args.text_file, "rb").read()
    data = torch.tensor(list(raw), dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, eval_data = data[:split], data[split:]
    if len(eval_data) < args.seq + 2 or len(train_data) < args.seq + 2:
        raise SystemExit(f"{args.text_file}: {len(data)} bytes is too short for --seq {args.seq}")
    model = build_model(args, device, dtype)
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"head_dim {model.config.hidden_size // model.config.num_attention_heads}, {len(data)} bytes of text, "
          f"{device}", flush=True)

    if args.bf16_steps:
        train(model, train_data, args.bf16_steps, args, device, "sdpa")
    switch_to_attnqat(model)
    before = {m: held_out_loss(model, eval_data, args, device, m) for m in ("bf16", "fp4")}
    print(f"held-out loss before QAT: bf16 attention {before['bf16']:.4f}, fp4 attention {before['fp4']:.4f}", flush=True)
    with attnqat.config(mode="attn_qat", p_quant=args.p_quant):
        train(model, train_data, args.steps, args, device, "attn_qat")
    after = {m: held_out_loss(model, eval_data, args, device, m) for m in ("bf16", "fp4")}
    print(f"held-out loss after QAT:  bf16 attention {after['bf16']:.4f}, fp4 attention {after['fp4']:.4f}", flush=True)
    if not all(math.isfinite(v) for v in (*before.values(), *after.values())):
        raise SystemExit("non-finite loss")
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
