"""Speed and memory ratios, each measured side by side in one run (absolute times on shared machines are noise).

    python benchmarks/benchmark.py                 # MiniLM encoder + the default small GPT-2, batch 32
    python benchmarks/benchmark.py --quick         # a tiny random model, for a smoke run
    python benchmarks/benchmark.py --device cuda   # the same ratios on a GPU, plus throughput figures
                                                   # (results_gpu.json; --extended adds them on a CPU too)

Targets (ROADMAP.md): training step Scale-VAE / VAE <= 1.03; generation from a latent >= 0.9x the decoder's plain
`generate` and >= 5x a cache-less loop; IW-NLL with k samples <= 1.25x the floor of k batched teacher-forced decoder
forwards; tokenisation + collation < 5% of a training step; peak memory <= 1.1x the same parts trained as an AE.
Each timing alternates the contenders in rounds and keeps the median, so slow phases of the machine hit both.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainingArguments  # noqa: E402

from scalevae.data import DataCollatorForLatentLM, tokenize_texts  # noqa: E402
from scalevae.metrics import iw_log_likelihood  # noqa: E402
from scalevae.recipe import RunSpec, build_or_load, prepare_data, quiet  # noqa: E402

DEVICE = torch.device("cpu")


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_times(contenders: dict, rounds: int) -> dict[str, float]:
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def benchmark_spec(args) -> RunSpec:
    """The main job's model (the run recipe's: MiniLM + a new 4x256 GPT-2 on a BPE fitted to the embedded corpus), or
    a tiny one with --quick."""
    spec = RunSpec(
        training=TrainingArguments(output_dir="outputs/benchmark", seed=0, report_to=[]),
        config=dict(latent_size=32),
    )
    tiny = dict(decoder_layers=1, decoder_width=64, decoder_heads=2) if args.quick else {}
    return spec.replace(model=dict(encoder=args.encoder, **tiny), data=dict(max_length=args.max_length))


_DATA = {}


def setup(strategy: str, args):
    """A model of the recipe with `strategy`, seeded, on the device; the data (tokenizers, texts) prepared once."""
    spec = benchmark_spec(args)
    with quiet():
        if "data" not in _DATA:
            _DATA["data"] = prepare_data(spec)
        data = _DATA["data"]
        model = build_or_load(spec.replace({"collapse_strategy": strategy}), data)
    return model.to(DEVICE), data.encoder_tokenizer, data.decoder_tokenizer


def batch_texts(args) -> list[str]:
    return _DATA["data"].texts["train"][: args.batch_size]


def training_step_fn(model, batch, dtype=None):
    """One optimizer step; `dtype` (torch.bfloat16) runs forward under autocast, as Trainer's --bf16 does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast(DEVICE.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.collapse.end_step()  # the strategy's step hook, as the recipe's Trainer calls it

    return step


def peak_memory_child(strategy: str, args) -> None:
    """Runs in a subprocess: a few training steps, then prints the process's peak resident memory (MiB)."""
    model, enc, dec = setup(strategy, args)
    batch = collate(batch_texts(args), enc, dec, args.max_length)
    step = training_step_fn(model, batch)
    for _ in range(3):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def collate(texts, enc, dec, max_length):
    """What one training batch costs on the data side if done on the fly: tokenising its texts with both tokenizers
    (the work `tokenize_dataset` does once, cached, for a whole corpus) plus dynamic padding by the collator."""
    columns = tokenize_texts(texts, enc, dec, max_length)
    features = [{key: columns[key][i] for key in ("input_ids", "attention_mask", "labels")} for i in range(len(texts))]
    return {key: value.to(DEVICE) for key, value in DataCollatorForLatentLM(enc, dec)(features).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--importance_samples", type=int, default=50)
    parser.add_argument("--output", default=None, help="default: benchmarks/results.json (results_gpu.json on cuda)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--extended", action="store_true", help="throughput figures also on a CPU (always on cuda)")
    parser.add_argument("--large_batch", type=int, default=256, help="the large batch of the throughput figures")
    parser.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args._memory_child:
        return peak_memory_child(args._memory_child, args)

    results = {}

    # 1. Training step: Scale-VAE against a plain VAE with the same parts.
    scale, enc, dec = setup("scale", args)
    vae, _, _ = setup("vae", args)
    texts = batch_texts(args)
    batch = collate(texts, enc, dec, args.max_length)
    steps = {"scale": training_step_fn(scale, batch), "vae": training_step_fn(vae, batch)}
    for fn in steps.values():
        fn()  # warm-up
    t = median_times(steps, args.rounds)
    results["train_step_scale_over_vae"] = t["scale"] / t["vae"]
    steps_bf16 = {
        "scale": training_step_fn(scale, batch, torch.bfloat16),
        "vae": training_step_fn(vae, batch, torch.bfloat16),
    }
    for fn in steps_bf16.values():
        fn()
    t_bf16 = median_times(steps_bf16, args.rounds)
    results["train_step_scale_over_vae_bf16"] = t_bf16["scale"] / t_bf16["vae"]
    throughput = {
        "train_sentences_per_s_fp32": args.batch_size / t["scale"],
        "train_sentences_per_s_bf16": args.batch_size / t_bf16["scale"],
    }

    # 2. Tokenisation + collation against a training step.
    t_data = median_times({"data": lambda: collate(texts, enc, dec, args.max_length)}, args.rounds)["data"]
    results["data_over_train_step"] = t_data / t["scale"]

    # 3. Generation from a latent: our cached generate, GPT-2's own generate, and a cache-less loop.
    scale.eval()
    z = scale.encode(batch["input_ids"], batch["attention_mask"]).decoder_mu.detach()
    bos = torch.full((z.shape[0], 1), dec.bos_token_id, device=DEVICE)
    new_tokens = args.max_length
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    @torch.no_grad()
    def cacheless():
        ids = bos
        for _ in range(new_tokens):
            ids = torch.cat([ids, scale(decoder_input_ids=ids, latents=z).logits[:, -1:].argmax(-1)], 1)

    t = median_times(
        {
            "ours": lambda: scale.generate(latents=z, **gen),
            "gpt2": lambda: scale.decoder.generate(bos, attention_mask=torch.ones_like(bos), **gen),
            "cacheless": cacheless,
        },
        max(3, args.rounds // 2),
    )
    results["generate_speed_vs_plain_gpt2"] = t["gpt2"] / t["ours"]
    results["generate_speedup_vs_cacheless"] = t["cacheless"] / t["ours"]

    # 4. IW-NLL with k samples against its floor: k teacher-forced decoder forwards, batched the same way.
    k, chunk = args.importance_samples, 50
    sub = {key: v[:8] for key, v in batch.items()}
    gen_z = torch.Generator(device=DEVICE).manual_seed(0)

    @torch.no_grad()
    def floor():
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            rep = {key: v.repeat_interleave(c, 0) for key, v in sub.items()}
            scale.log_likelihood(
                torch.randn(rep["labels"].shape[0], 32, device=DEVICE),
                rep["decoder_input_ids"],
                rep["labels"],
                rep["decoder_attention_mask"],
            )

    t = median_times(
        {"iw": lambda: iw_log_likelihood(scale, sub, k, chunk, gen_z), "floor": floor}, max(3, args.rounds // 2)
    )
    results["iw_nll_over_decoder_floor"] = t["iw"] / t["floor"]

    # 5. Peak memory, each in a fresh process: Scale-VAE against the same parts trained as an AE.
    def peak(strategy):
        command = [
            sys.executable,
            __file__,
            "--_memory_child",
            strategy,
            "--batch_size",
            str(args.batch_size),
            "--max_length",
            str(args.max_length),
        ] + (["--quick"] if args.quick else [])
        if args.encoder:
            command += ["--encoder", args.encoder]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    results["peak_memory_scale_over_ae"] = peak("scale") / peak("ae")

    # 6. Throughput (on a GPU, or with --extended): latent generation at batch 1 and a large batch against the
    # decoder's plain generate, IW-NLL sentences/s, peak GPU memory of a training step.
    if DEVICE.type == "cuda" or args.extended:
        for size in (1, args.large_batch):
            zs = z[:1].expand(size, -1).contiguous()
            start_ids = torch.full((size, 1), dec.bos_token_id, device=DEVICE)
            t = median_times(
                {
                    "ours": lambda: scale.generate(latents=zs, **gen),
                    "gpt2": lambda: scale.decoder.generate(
                        start_ids, attention_mask=torch.ones_like(start_ids), **gen
                    ),
                },
                3,
            )
            results[f"generate_speed_vs_plain_gpt2_batch{size}"] = t["gpt2"] / t["ours"]
            throughput[f"generate_tokens_per_s_batch{size}"] = size * new_tokens / t["ours"]
        t_iw = median_times({"iw": lambda: iw_log_likelihood(scale, sub, k, chunk, gen_z)}, 3)["iw"]
        throughput[f"iw_nll_sentences_per_s_k{k}"] = sub["labels"].shape[0] / t_iw
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            steps["scale"]()
            throughput["peak_gpu_memory_mib_train_step"] = torch.cuda.max_memory_allocated() / 2**20

    targets = {
        "train_step_scale_over_vae": ("<=", 1.03),
        "data_over_train_step": ("<", 0.05),
        "generate_speed_vs_plain_gpt2": (">=", 0.9),
        "generate_speedup_vs_cacheless": (">=", 5.0),
        "iw_nll_over_decoder_floor": ("<=", 1.25),
        "peak_memory_scale_over_ae": ("<=", 1.1),
        "train_step_scale_over_vae_bf16": ("<=", 1.03),
        "generate_speed_vs_plain_gpt2_batch1": (">=", 0.9),
        f"generate_speed_vs_plain_gpt2_batch{args.large_batch}": (">=", 0.9),
    }
    print(f"{'ratio':36}{'measured':>10}  target")
    for name, value in results.items():
        op, bound = targets[name]
        ok = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
        print(f"{name:36}{value:10.3f}  {op} {bound}  {'ok' if ok else 'MISSED'}")
    for name, value in throughput.items():
        print(f"{name:36}{value:10.1f}")
    setting = (
        "MiniLM-L6 encoder + " + ("1x64" if args.quick else "4x256") + " GPT-2 decoder on the main job's fitted BPE"
    )
    card = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    output = args.output or ("benchmarks/results_gpu.json" if DEVICE.type == "cuda" else "benchmarks/results.json")
    Path(output).write_text(
        json.dumps(
            dict(
                setting=setting,
                device=card,
                torch=torch.__version__,
                batch_size=args.batch_size,
                max_length=args.max_length,
                results=results,
                throughput=throughput,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
