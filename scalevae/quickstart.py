"""The main job: train a Scale-VAE on the embedded default corpus, offline, on a CPU in minutes, and show what it
learned: a metrics table (with a plain VAE beside it on request), reconstructions, samples, an interpolation, PNG plots
and a Hub-ready model folder."""

import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import TrainingArguments, set_seed

from .data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
from .hub import save_model
from .metrics import evaluate_model, reconstruction_bleu_of
from .plots import plot_latent_map, plot_training_curves
from .text import LatentText, build_model
from .training import make_trainer

TABLE_ROWS = [
    ("nll", "IW-NLL (nats/sentence)", ".2f"),
    ("ppl", "PPL", ".1f"),
    ("elbo", "ELBO (nats/sentence)", ".2f"),
    ("kl", "KL, original posterior", ".2f"),
    ("decoder_kl", "KL, decoder's latent (bound)", ".2f"),
    ("mi", "MI, original posterior", ".2f"),
    ("mi_decoder", "MI, decoder's latent", ".2f"),
    ("au", "AU, original posterior", "d"),
    ("au_decoder", "AU, decoder's latent", "d"),
    ("token_accuracy", "token accuracy from mean z", ".3f"),
    ("shuffle_gap", "shuffled-z NLL gap (nats)", ".2f"),
    ("bleu", "reconstruction BLEU", ".1f"),
]

def train_and_evaluate(
    output_dir: Path,
    data_files: dict[str, str] | None,
    train_sentences: int | None,
    collapse_strategy: str,
    max_steps: int,
    batch_size: int,
    max_length: int,
    latent_size: int,
    learning_rate: float,
    num_importance_samples: int,
    eval_sentences: int,
    seed: int,
    logging_steps: int,
) -> dict:
    set_seed(seed)
    model, encoder_tokenizer, decoder_tokenizer = build_model(
        latent_size=latent_size, collapse_strategy=collapse_strategy
    )
    raw = load_text_dataset(data_files)
    if train_sentences:
        raw["train"] = raw["train"].select(range(min(train_sentences, len(raw["train"]))))
    raw["test"] = raw["test"].select(range(min(eval_sentences, len(raw["test"]))))
    dataset, truncation = tokenize_dataset(raw, encoder_tokenizer, decoder_tokenizer, max_length)
    collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    test = dataset["test"]
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),  # TensorBoard logs go to trainer/runs/
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        learning_rate=learning_rate,
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.0,
        logging_steps=logging_steps,
        report_to=["tensorboard"],
        save_strategy="no",
        seed=seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = make_trainer(model, args, dataset["train"], collator, eval_dataset=dataset["validation"])
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    model.eval()
    loader = DataLoader(test, batch_size=32, collate_fn=collator)
    metrics = evaluate_model(model, loader, num_importance_samples=num_importance_samples,
                             generator=torch.Generator().manual_seed(seed))
    metrics["bleu"] = reconstruction_bleu_of(model, raw["test"]["text"], encoder_tokenizer, decoder_tokenizer, max_length)
    metrics.update(dataset=data_files["test"] if data_files else "embedded default corpus", split="test",
                   num_importance_samples=num_importance_samples)
    timing = dict(train_seconds=train_seconds, seconds_per_step=train_seconds / max_steps)

    folder = output_dir / "model"
    command = f"scalevae quickstart --collapse_strategy {collapse_strategy} --max_steps {max_steps} --seed {seed}"
    corpus = "embedded default corpus (Python standard library docstrings, scalevae/corpus)"
    training = dict(
        data=f"{data_files['train'] if data_files else corpus}, {len(dataset['train'])} training sentences",
        steps=max_steps, batch_size=batch_size, max_length=max_length, learning_rate=learning_rate, seed=seed,
        truncated=truncation["train"], command=command,
        evaluation=f"{len(test)} test sentences, {num_importance_samples} importance samples",
        training_time=f"{train_seconds:.0f} s ({timing['seconds_per_step']:.2f} s/step) on {describe_device()}",
    )
    save_model(folder, model, encoder_tokenizer, decoder_tokenizer, metrics=metrics, training=training)

    with torch.no_grad():
        latents = torch.cat([model.encode(b["input_ids"], b["attention_mask"]).decoder_mu for b in loader])
    lengths = torch.tensor([len(labels) for labels in test["labels"]], dtype=torch.float)
    return dict(model=model, tokenizers=(encoder_tokenizer, decoder_tokenizer), metrics=metrics, timing=timing,
                test_texts=raw["test"]["text"], lengths=lengths,
                history=trainer.state.log_history, latents=latents, folder=folder)


def describe_device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def format_table(results: dict[str, dict]) -> str:
    runs = list(results)
    lines = [f"{'metric (test set)':34}" + "".join(f"{run:>12}" for run in runs), "-" * (34 + 12 * len(runs))]
    for key, label, fmt in TABLE_ROWS:
        values = [results[run]["metrics"].get(key) for run in runs]
        lines.append(f"{label:34}" + "".join(f"{format(v, fmt):>12}" if v is not None else f"{'-':>12}" for v in values))
    return "\n".join(lines)


def show_examples(model, tokenizers, texts: list[str], seed: int) -> str:
    """Held-out reconstructions, prior samples and an interpolation between the first two texts."""
    text = LatentText(model, *tokenizers, max_length=32)
    # A briefly trained decoder loops on frequent words under greedy decoding; blocking repeated trigrams is the
    # usual remedy, and it is said in the header.
    greedy = dict(no_repeat_ngram_size=3)
    lines = ["Reconstructions of test sentences (greedy with no_repeat_ngram_size=3, from the posterior mean):"]
    for source, output in zip(texts, text.reconstruct(texts, **greedy)):
        lines += [f"  in : {source}", f"  out: {output}"]
    lines.append("Samples from the prior N(0, diag(f^2)) (nucleus sampling, top_p=0.9):")
    generator = torch.Generator(device=model.device).manual_seed(seed)
    lines += [f"  - {s}" for s in text.sample(4, generator=generator, do_sample=True, top_p=0.9, max_new_tokens=32)]
    lines.append(f"Interpolation from {texts[0]!r} to {texts[1]!r}:")
    lines += [f"  {i}. {s}" for i, s in enumerate(text.interpolate(texts[0], texts[1], steps=5, **greedy))]
    return "\n".join(lines)


def run(
    output_dir: str = "outputs/quickstart",
    collapse_strategy: str = "scale",
    compare_vae: bool = False,
    data_files: dict[str, str] | None = None,
    train_sentences: int | None = None,
    max_steps: int = 400,
    batch_size: int = 32,
    max_length: int = 32,
    latent_size: int = 32,
    learning_rate: float = 5e-4,
    num_importance_samples: int = 20,
    eval_sentences: int = 200,
    seed: int = 0,
    logging_steps: int = 25,
) -> dict[str, dict]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    output = Path(output_dir)
    strategies = [collapse_strategy] + (["vae"] if compare_vae and collapse_strategy != "vae" else [])
    results = {}
    for strategy in strategies:
        print(f"\n=== training collapse_strategy={strategy!r} for {max_steps} steps ===", flush=True)
        results[strategy] = train_and_evaluate(
            output / strategy, data_files, train_sentences, strategy, max_steps, batch_size, max_length, latent_size, learning_rate,
            num_importance_samples, eval_sentences, seed, logging_steps,
        )
    table = format_table(results)
    print("\n" + table)
    main = results[collapse_strategy]
    examples = show_examples(main["model"], main["tokenizers"], main["test_texts"][:4], seed)
    print("\n" + examples)
    curves = plot_training_curves({s: r["history"] for s, r in results.items()}, output / "training_curves.png")
    latent_map = plot_latent_map({s: r["latents"] for s, r in results.items()}, output / "latent_map.png",
                                 colors=main["lengths"], color_label="sentence length (tokens)")
    summary = {s: {**r["metrics"], **r["timing"]} for s, r in results.items()}
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    (output / "results.md").write_text(f"```\n{table}\n```\n\n```\n{examples}\n```\n")
    print(f"\nSaved: model folder(s) {', '.join(str(r['folder']) for r in results.values())}; plots {curves}, "
          f"{latent_map}; metrics {output / 'results.json'}")
    return results
