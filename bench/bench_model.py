"""Model level: a ~0.5 B-parameter Qwen3 (transformers, random init, bf16, eager: no compile) with
attnqat attention against torch SDPA, same process, same GPU, same weights.

Model: Qwen3Config with hidden 1024, 24 layers, 16 query heads, 8 KV heads, head dim 128,
intermediate 3072, vocabulary 49152, untied embeddings (0.48 B parameters), no dropout.

1. Training step throughput (batch 1, `--train-tokens` 4096 and 16384 tokens, no padding):
   forward with labels (`use_cache=False`, as the Trainer), backward, AdamW step, zero_grad;
   `attn_implementation="attnqat"` under `attnqat.config(mode="attn_qat")` against
   `attn_implementation="sdpa"` (torch's default SDPA backend; the JSON names the backend torch's
   dispatcher picks for these shapes). Both start from the same weights (a state saved before the
   first step is loaded before each implementation). Time per step: CUDA events around the whole
   step, median of `--reps` after 2 warm-up steps (common.time_cuda); throughput = tokens / time.
   If a length does not fit in GPU memory at 24 layers, it is retried with 12, then 6 layers (the
   JSON's `layers` and `note` say so); gradient checkpointing stays off.
2. Generation (B 8, an 8192-token prompt without padding, 64 new tokens, greedy) with attnqat
   attention in mode `fp4` for both: `attnqat.hf.FP4Cache` (K, V in packed NVFP4 pages, decode
   kernel) against transformers' default `DynamicCache` (bf16 K, V). Time: CUDA events around
   `model.generate`, median of `--reps` after one warm-up; a run with one new token (the prefill)
   gives the decode time per token by difference. The fraction of generated tokens on which the two
   agree is recorded (they differ by the order of fp32 sums on CUDA).

Headlines: `model_train_step_attn_qat_vs_sdpa_16k` and `_4k` (attnqat throughput / SDPA throughput;
targets 0.95 and 0.90) and `model_generate_fp4cache_vs_bf16cache` (DynamicCache time / FP4Cache
time; target > 1). `--quick`: 6 layers, 4096 tokens only, generation with B 8, a 2048-token prompt
and 16 new tokens (headline entries carry `layers` and the lengths).

    python bench/bench_model.py [--out DIR] [--quick] [--layers 24] [--train-tokens 4096 16384]
    python bench/bench_model.py --smoke --out DIR    # CPU, a tiny model: code paths only
"""

from __future__ import annotations

import gc
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnqat  # noqa: E402

TARGETS = {4096: 0.90, 16384: 0.95}
GENERATE_TARGET = 1.0
LAYER_FALLBACKS = (12, 6)  # layers to retry a training length with when it runs out of memory
MODEL = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
             vocab_size=49152)
SMOKE_MODEL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                   vocab_size=512)


def build_model(layers: int, smoke: bool, device, max_positions: int):
    """The Qwen3 of the docstring (or a tiny one for --smoke), bf16, on `device`, seeded."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(num_hidden_layers=layers, max_position_embeddings=max_positions, tie_word_embeddings=False,
                      attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                      **(SMOKE_MODEL if smoke else MODEL))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    # Greedy generation runs its full length: no end-of-sequence token.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def set_attention(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl
    if model.config._attn_implementation != impl:
        raise RuntimeError(f"the model did not switch to attn_implementation={impl!r}")


def sdpa_default_backend(n: int, device) -> str:
    """The backend torch's SDPA dispatcher picks for causal GQA attention of the model's shapes."""
    q = torch.empty(1, MODEL["num_attention_heads"], n, MODEL["head_dim"], device=device, dtype=torch.bfloat16)
    k = torch.empty(1, MODEL["num_key_value_heads"], n, MODEL["head_dim"], device=device, dtype=torch.bfloat16)
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, k, None, 0.0, True, scale=None, enable_gqa=True)).name
    except Exception as e:  # a private function: record why it could not say
        return f"unknown ({type(e).__name__}: {str(e)[:80]})"


def cuda_cleanup(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_training(model, initial_state, impl: str, n: int, args, device, timer) -> dict:
    """Training steps at n tokens (batch 1) with attention `impl`, from `initial_state`."""
    model.load_state_dict(initial_state)
    set_attention(model, impl)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, foreach=True)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (1, n), device=device, generator=g)
    losses = []

    def step(i):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if len(losses) < 1:
            losses.append(loss.detach())

    cuda_cleanup(device)
    with attnqat.config(mode="attn_qat"):  # read only by the "attnqat" implementation
        t = timer(step, warmup=2, reps=args.reps)
    t["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    t["first_loss"] = float(losses[0])
    t["tokens_per_s"] = n / (t["median_ms"] * 1e-3)
    return t


def train_rows(args, device, timer) -> list:
    rows = []
    models = {}  # layers -> (model, initial state)
    for n in args.train_tokens:
        note = None
        for layers in (args.layers,) + tuple(x for x in LAYER_FALLBACKS if x < args.layers):
            try:
                if layers not in models:
                    models.clear()
                    cuda_cleanup(device)
                    model = build_model(layers, args.smoke, device, max(args.train_tokens) + 64)
                    models[layers] = (model, {k: v.detach().clone() for k, v in model.state_dict().items()})
                model, state = models[layers]
                times = {impl: time_training(model, state, impl, n, args, device, timer)
                         for impl in ("sdpa", "attnqat")}
                break
            except torch.cuda.OutOfMemoryError as e:
                note = (f"out of GPU memory at {layers} layers ({str(e).splitlines()[0][:120]}); "
                        f"the comparison at this length uses fewer layers")
                print(f"train {n} tokens: {note}", flush=True)
                models.clear()
                cuda_cleanup(device)
        else:
            print(f"train {n} tokens: out of memory at every layer count; skipped")
            continue
        params = sum(p.numel() for p in models[layers][0].parameters())
        for impl, t in times.items():
            rows.append({"part": "train_step", "attention": impl, "mode": "attn_qat" if impl == "attnqat" else "bf16",
                         "tokens": n, "batch": 1, "layers": layers, "parameters": params, "note": note,
                         "sdpa_backend": sdpa_default_backend(n, device) if impl == "sdpa" and not args.smoke else None,
                         **t})
        rows.append({"part": "train_step ratio", "tokens": n, "layers": layers, "note": note,
                     "attnqat_over_sdpa_throughput": times["attnqat"]["tokens_per_s"] / times["sdpa"]["tokens_per_s"]})
        print(f"train {n} tokens, {layers} layers: sdpa {times['sdpa']['median_ms']:.1f} ms, attnqat "
              f"{times['attnqat']['median_ms']:.1f} ms", flush=True)
    models.clear()
    cuda_cleanup(device)
    return rows


def cache_argument(model) -> str:
    """transformers 5.2x renamed generate's/forward's past_key_values to cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate_rows(args, device, timer) -> list:
    b, prompt, new = args.gen_batch, args.gen_prompt, args.gen_new
    model = build_model(args.layers, args.smoke, device, prompt + new + 64)
    set_attention(model, "attnqat")
    model.eval()
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(1, model.config.vocab_size, (b, prompt), device=device, generator=g)
    mask = torch.ones_like(ids)
    caches = {
        "FP4Cache": lambda: attnqat.hf.FP4Cache(model, max_cache_len=prompt + new, page_size=64),
        "DynamicCache (bf16)": lambda: None,  # transformers' default
    }
    outputs, rows, times = {}, [], {}
    for name, make_cache in caches.items():
        def run(i, tokens=new):
            cache = make_cache()
            kw = {cache_argument(model): cache} if cache is not None else {}
            out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, **kw)
            if out.shape != (b, prompt + tokens):
                raise RuntimeError(f"generate returned {list(out.shape)}, expected {[b, prompt + tokens]}")
            if cache is not None and cache.store is None:
                raise RuntimeError("generate did not use the FP4Cache it was given (its pages were never allocated)")
            if tokens == new:
                outputs[name] = out[:, prompt:]

        cuda_cleanup(device)
        try:
            with attnqat.config(mode="fp4"):
                t = timer(run, warmup=1, reps=args.reps)
                prefill = timer(lambda i: run(i, tokens=1), warmup=1, reps=args.reps)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            print(f"generate with {name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        t["prefill_ms"] = prefill["median_ms"]
        t["decode_ms_per_token"] = (t["median_ms"] - prefill["median_ms"]) / max(new - 1, 1)
        t["new_tokens_per_s"] = b * new / (t["median_ms"] * 1e-3)
        t["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
        cache = make_cache()  # (its pages are allocated on first use: none here)
        t["cache_bytes_per_token"] = cache.bytes_per_token if cache is not None else (
            model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * model.config.head_dim * 2)
        times[name] = t
        rows.append({"part": "generate", "cache": name, "attention": "attnqat", "mode": "fp4", "batch": b,
                     "prompt_tokens": prompt, "new_tokens": new, "layers": args.layers, **t})
        print(f"generate with {name}: {t['median_ms']:.1f} ms (prefill {t['prefill_ms']:.1f} ms, "
              f"{t['decode_ms_per_token']:.2f} ms per decode step)", flush=True)
    if len(times) == 2:
        agree = (outputs["FP4Cache"] == outputs["DynamicCache (bf16)"]).float().mean().item()
        ratio = times["DynamicCache (bf16)"]["median_ms"] / times["FP4Cache"]["median_ms"]
        rows.append({"part": "generate ratio", "batch": b, "prompt_tokens": prompt, "new_tokens": new,
                     "layers": args.layers, "token_agreement": agree, "bf16cache_over_fp4cache_time": ratio})
    del model
    cuda_cleanup(device)
    return rows


def parse_args(argv=None):
    p = common.bench_parser(__doc__, "6 layers, 4k training tokens, a 2k prompt", "a tiny model")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 24, --quick 6)")
    p.add_argument("--train-tokens", type=int, nargs="*", default=None,
                   help="training lengths (default 4096 16384; --quick 4096); none: skip training")
    p.add_argument("--gen-batch", type=int, default=None, help="generation batch (default 8)")
    p.add_argument("--gen-prompt", type=int, default=None, help="prompt tokens (default 8192, --quick 2048)")
    p.add_argument("--gen-new", type=int, default=None, help="new tokens (default 64, --quick 16)")
    p.add_argument("--no-generate", action="store_true", help="skip the generation comparison")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, --quick 3)")
    args = p.parse_args(argv)
    quick, smoke = args.quick, args.smoke
    defaults = dict(layers=2 if smoke else 6 if quick else 24,
                    train_tokens=[64] if smoke else [4096] if quick else [4096, 16384],
                    gen_batch=2 if smoke else 8, gen_prompt=32 if smoke else 2048 if quick else 8192,
                    gen_new=4 if smoke else 16 if quick else 64, reps=2 if smoke else 3 if quick else 5)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.gen_new < 2:
        p.error("--gen-new: at least 2 new tokens (the decode time per token is taken by difference)")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.require_device(args.smoke, args.out)
    device = torch.device("cpu" if args.smoke else "cuda")
    banner = common.device_banner(args.smoke)
    common.print_banner(banner)
    timer = common.time_wall if args.smoke else common.time_cuda
    attnqat.hf.register()
    print(f"Qwen3, {args.layers} layers, {'a tiny config' if args.smoke else MODEL}; bf16, eager", flush=True)
    rows = train_rows(args, device, timer) if args.train_tokens else []
    if not args.no_generate:
        rows += generate_rows(args, device, timer)
    config = {"model": "Qwen3", "config": SMOKE_MODEL if args.smoke else MODEL, "layers": args.layers,
              "dtype": "bfloat16", "compile": False, "optimizer": "AdamW (foreach), bf16 parameters",
              "quick": args.quick}
    path = common.write_results("model", banner, rows, args.out, extra={"run": config})
    print(f"\n{'part':<12} {'attention / cache':<20} {'tokens':>14} {'layers':>6} {'ms':>10} {'tokens/s':>11} "
          f"{'peak GiB':>8}")
    for r in rows:
        if r["part"] == "train_step":
            print(f"{'train':<12} {r['attention']:<20} {r['tokens']:>14} {r['layers']:>6} {r['median_ms']:10.1f} "
                  f"{r['tokens_per_s']:11.0f} {r['peak_memory_gib'] or 0:8.1f}")
        elif r["part"] == "generate":
            shape = f"{r['batch']}x{r['prompt_tokens']}+{r['new_tokens']}"
            print(f"{'generate':<12} {r['cache']:<20} {shape:>14} {r['layers']:>6} {r['median_ms']:10.1f} "
                  f"{r['new_tokens_per_s']:11.0f} {r['peak_memory_gib'] or 0:8.1f}")
    day = str(banner["date"])[:10]
    common_fields = {"gpu": banner["gpu"], "date": day, "source": f"bench/results/{path.name}"}
    metrics = {}
    for r in rows:
        if r["part"] == "train_step ratio":
            n = r["tokens"]
            name = f"model_train_step_attn_qat_vs_sdpa_{f'{n // 1024}k' if n % 1024 == 0 else n}"
            metrics[name] = {"value": round(r["attnqat_over_sdpa_throughput"], 4), "target": TARGETS.get(r["tokens"]),
                             **common_fields, "layers": r["layers"], "tokens": r["tokens"], "note": r["note"],
                             "aggregate": (f"Qwen3 ~0.5B ({r['layers']} layers), batch 1, {r['tokens']} tokens, bf16, "
                                           "eager; training step (fwd, bwd, AdamW) throughput, attnqat attn_qat over "
                                           "torch SDPA; median of steps")}
        elif r["part"] == "generate ratio":
            metrics["model_generate_fp4cache_vs_bf16cache"] = {
                "value": round(r["bf16cache_over_fp4cache_time"], 4), "target": GENERATE_TARGET, **common_fields,
                "layers": r["layers"], "token_agreement": round(r["token_agreement"], 4),
                "aggregate": (f"Qwen3 ~0.5B ({r['layers']} layers), B {r['batch']}, {r['prompt_tokens']}-token prompt, "
                              f"{r['new_tokens']} new tokens, attnqat fp4 attention; generate() time with "
                              "DynamicCache (bf16) over FP4Cache; median; the target is a value above 1")}
    common.update_headline(metrics, args.out)
    print(f"\nwrote {path}")
    common.print_headline(metrics)


if __name__ == "__main__":
    main()
