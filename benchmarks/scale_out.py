"""torch.compile and static-cache figures, each measured side by side in one run (issue 18).

    python benchmarks/scale_out.py                    # the benchmark's model (MiniLM + 4x256 GPT-2) on the CPU
    python benchmarks/scale_out.py --quick            # a tiny decoder, for a smoke run
    python benchmarks/scale_out.py --device cuda      # on a GPU (static + compile then uses CUDA graphs)

1. Training step, eager against `torch.compile(model)` (inductor; one graph, no graph break): the compile time (the
   first compiled step less a steady one) and the steady-state time ratio, contenders alternating in rounds.
2. Generation from a latent at batch 1 and `--large_batch`: tokens/s of the decoder's own `generate` (plain GPT-2, no
   latent), ours with the dynamic cache, with `cache_implementation="static"`, and static + compiled decoding steps.

Results go to `--output` (default benchmarks/scale_out.json, scale_out_gpu.json on cuda). Compile times are cold:
inductor's caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 unless set), or a second run would time a cache hit.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from transformers.generation.configuration_utils import CompileConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalevae.data import DataCollatorForLatentLM, tokenize_texts  # noqa: E402
from scalevae.recipe import RunSpec, build_or_load, prepare_data, quiet  # noqa: E402


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_times(contenders: dict, rounds: int, device) -> dict[str, float]:
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--large_batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    spec = RunSpec(
        training=TrainingArguments(output_dir="outputs/benchmark", seed=0, report_to=[]),
        config=dict(latent_size=32),
    )
    tiny = dict(decoder_layers=1, decoder_width=64, decoder_heads=2) if args.quick else {}
    spec = spec.replace(model=dict(encoder=args.encoder, **tiny), data=dict(max_length=args.max_length))
    with quiet():
        data = prepare_data(spec)
        eager, compiled = (build_or_load(spec, data).to(device) for _ in range(2))  # the same seeded weights
    enc, dec = data.encoder_tokenizer, data.decoder_tokenizer
    texts = data.texts["train"][: args.batch_size]
    columns = tokenize_texts(texts, enc, dec, args.max_length)
    features = [{k: columns[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(texts))]
    batch = {k: v.to(device) for k, v in DataCollatorForLatentLM(enc, dec)(features).items()}
    results, throughput, seconds = {}, {}, {}

    # 1. Training step.
    def step_fn(model, forward):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step():
            loss = forward(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.collapse.end_step()

        return step

    steps = {"eager": step_fn(eager, eager), "compiled": step_fn(compiled, torch.compile(compiled, fullgraph=True))}
    steps["eager"]()
    first_compiled = timed(steps["compiled"], device)
    t = median_times(steps, args.rounds, device)
    seconds["train_step_compile"] = first_compiled - t["compiled"]
    results["train_step_compiled_over_eager"] = t["compiled"] / t["eager"]
    throughput["train_sentences_per_s_eager"] = args.batch_size / t["eager"]
    throughput["train_sentences_per_s_compiled"] = args.batch_size / t["compiled"]

    # 2. Generation from a latent.
    model = eager.eval()
    z = model.encode(batch["input_ids"][:1], batch["attention_mask"][:1]).decoder_mu.detach()
    new = args.max_length
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    compile_config._compile_all_devices = True  # GenerationMixin compiles only on accelerators unless told
    for size in (1, args.large_batch):
        zs = z.expand(size, -1).contiguous()
        bos = torch.full((size, 1), dec.bos_token_id, device=device)
        contenders = {
            "gpt2": lambda: model.decoder.generate(bos, attention_mask=torch.ones_like(bos), **gen),
            "dynamic": lambda: model.generate(latents=zs, **gen),
            "static": lambda: model.generate(latents=zs, cache_implementation="static", **gen),
            "static_compiled": lambda: model.generate(
                latents=zs, cache_implementation="static", compile_config=compile_config, **gen
            ),
        }
        for name, fn in contenders.items():  # warm-up; the compiled one compiles here
            warm = timed(fn, device)
            if name == "static_compiled":
                seconds[f"generate_compile_batch{size}"] = warm
        t = median_times(contenders, max(3, args.rounds // 2), device)
        for name in ("dynamic", "static", "static_compiled"):
            results[f"generate_{name}_vs_plain_gpt2_batch{size}"] = t["gpt2"] / t[name]
        for name, value in t.items():
            throughput[f"generate_tokens_per_s_{name}_batch{size}"] = size * new / value
        seconds[f"generate_compile_batch{size}"] -= t["static_compiled"]

    report = {
        "setting": "tiny decoder (--quick)" if args.quick else "MiniLM-L6 encoder + 4x256 GPT-2 decoder",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "results": results,
        "throughput": throughput,
        "compile_seconds": seconds,
    }
    default = "scale_out_gpu.json" if device.type == "cuda" else "scale_out.json"
    output = Path(args.output or Path(__file__).parent / default)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
