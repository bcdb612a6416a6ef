"""The main job: train a Scale-VAE on the embedded default corpus, offline, within a wall-clock budget, and show what
it learned: a metrics table (with a plain VAE beside it on request), reconstructions, prior samples, an interpolation,
PNG plots and a Hub-ready model folder.

Choices (measured in the README): the decoder writes with a byte-level BPE fitted to the training text (4,096 tokens)
rather than the encoder's 30k WordPiece vocabulary, and the pretrained MiniLM encoder is frozen (only the latent head
and the decoder train), which fits 1.7 times the steps into the budget. The learning rate is constant after a short
warm-up, so a run stopped by the clock at step N is the run `--max_steps N` gives, step for step.
"""

import contextlib
import json
import time
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from .data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
from .factory import build_model
from .hub import save_model
from .latent import LatentText
from .metrics import METRICS, evaluate_model, reconstruction_bleu_of
from .plots import plot_latent_map, plot_training_curves
from .training import make_trainer

# The console table's rows; their labels and formats come from `scalevae.metrics.METRICS`.
TABLE_ROWS = (
    "steps",
    "nll",
    "reconstruction_nll",
    "kl",
    "decoder_kl",
    "mi",
    "mi_decoder",
    "au",
    "au_decoder",
    "shuffle_gap",
    "token_accuracy",
    "bleu",
    "prior_distinct_2",
    "longest_repeat",
)
NAMES = {"scale": "Scale-VAE", "vae": "VAE", "free_bits": "free bits", "bn": "BN-VAE", "ae": "AE"}
SHOWN = dict(reconstructions=3, samples=4, interpolation=5)
PRIOR_SAMPLES = 20
PRIOR_FIT_SENTENCES = 1024
# Printed text is decoded as the README shows it: greedy for reconstructions and interpolations, nucleus sampling for
# prior samples, always blocking repeated trigrams (a short-trained decoder otherwise loops on frequent words).
GREEDY = dict(do_sample=False, no_repeat_ngram_size=3)
NUCLEUS = dict(do_sample=True, top_p=0.9, no_repeat_ngram_size=3)


class TimeBudgetCallback(TrainerCallback):
    """Stops training when the next `stop_every` steps would overrun `seconds` of wall-clock time, and shows one
    progress bar in seconds (the step count depends on the machine, the time does not).

    Training stops only at multiples of `stop_every` (the logging interval), projecting the next interval from the
    last one (so a machine that slows down mid-run still stops near the budget): a run that printed N steps is
    reproduced exactly by `--max_steps N` under a schedule that does not depend on the total (constant learning rate).
    """

    def __init__(self, seconds: float | None, stop_every: int, desc: str):
        self.seconds, self.stop_every, self.desc = seconds, stop_every, desc
        self.bar, self.start, self.last_check, self.loss = None, 0.0, 0.0, None
        self.elapsed = 0.0  # seconds from the first step's start to the last step's end

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_check = time.perf_counter()
        unit = "s" if self.seconds else "step"
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}{postfix}]"
        self.bar = tqdm(
            total=round(self.seconds) if self.seconds else state.max_steps,
            desc=self.desc,
            unit=unit,
            dynamic_ncols=True,
            bar_format=bar_format,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        elapsed, step = now - self.start, state.global_step
        self.elapsed = elapsed
        self.bar.set_postfix_str(
            f"step {step}" + (f", loss {self.loss:.1f}" if self.loss is not None else ""), refresh=False
        )
        self.bar.update((min(elapsed, self.seconds) if self.seconds else step) - self.bar.n)
        if self.seconds and step % self.stop_every == 0:
            if elapsed + (now - self.last_check) > self.seconds:
                control.should_training_stop = True
            self.last_check = now

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()


@contextlib.contextmanager
def quiet():
    """No progress bars for sub-second steps (`datasets`' map/filter passes over this small corpus, transformers'
    weight loading and saving) and no library warnings addressed to developers: the quickstart shows two bars per run,
    training and evaluation."""
    datasets_bars = datasets.is_progress_bar_enabled()
    transformers_bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if transformers_bars:
            hf_logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()


def train_and_evaluate(
    output_dir: Path,
    data_files: dict[str, str] | None,
    train_sentences: int | None,
    collapse_strategy: str,
    train_seconds: float | None,
    max_steps: int | None,
    batch_size: int,
    max_length: int,
    latent_size: int,
    learning_rate: float,
    warmup_steps: int,
    num_importance_samples: int,
    eval_sentences: int,
    seed: int,
    logging_steps: int,
    freeze_encoder: bool | int,
    decoder_vocab_size: int,
    des_std: float,
    encoder: str | None = None,
) -> dict:
    set_seed(seed)
    raw = load_text_dataset(data_files)
    if train_sentences:
        raw["train"] = raw["train"].select(range(min(train_sentences, len(raw["train"]))))
    raw["test"] = raw["test"].select(range(min(eval_sentences, len(raw["test"]))))
    model, encoder_tokenizer, decoder_tokenizer = build_model(
        encoder,
        train_texts=raw["train"]["text"],
        decoder_vocab_size=decoder_vocab_size,
        latent_size=latent_size,
        collapse_strategy=collapse_strategy,
        scale_target_std=des_std,
        freeze_encoder=freeze_encoder,
    )
    dataset, truncation = tokenize_dataset(raw, encoder_tokenizer, decoder_tokenizer, max_length)
    collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    test = dataset["test"]
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),  # TensorBoard logs go to trainer/runs/
        max_steps=max_steps or 10**7,  # the clock stops a budgeted run; the constant schedule ignores the total
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        logging_steps=logging_steps,
        report_to=["tensorboard"],
        save_strategy="no",
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = make_trainer(
        model,
        args,
        dataset["train"],
        collator,
        eval_dataset=dataset["validation"],
        prior_fit_sentences=PRIOR_FIT_SENTENCES,
    )
    trainer.remove_callback(PrinterCallback)  # the budget's bar shows the loss; the full logs go to TensorBoard
    trainer.remove_callback(ProgressCallback)
    name = NAMES.get(collapse_strategy, collapse_strategy)
    budget = TimeBudgetCallback(None if max_steps else train_seconds, logging_steps, f"train {name}")
    trainer.add_callback(budget)
    # The prior that samples come from is refitted when training ends; 1,024 sentences pin its 32 means and variances
    # down to a few percent in a quarter of the default's time on a CPU.
    trainer.train()
    train_seconds, steps = budget.elapsed, trainer.state.global_step

    model.eval()
    loader = DataLoader(test, batch_size=32, collate_fn=collator)
    metrics = evaluate_model(
        model, loader, num_importance_samples=num_importance_samples, generator=torch.Generator().manual_seed(seed)
    )
    metrics["bleu"] = reconstruction_bleu_of(
        model, raw["test"]["text"], encoder_tokenizer, decoder_tokenizer, max_length
    )
    samples = prior_samples(model, (encoder_tokenizer, decoder_tokenizer), PRIOR_SAMPLES, seed, max_length)
    metrics["prior_distinct_2"] = distinct_bigrams(samples)
    metrics.update(
        dataset=data_files["test"] if data_files else "embedded default corpus",
        split="test",
        num_importance_samples=num_importance_samples,
    )
    timing = dict(steps=steps, train_seconds=train_seconds, seconds_per_step=train_seconds / max(steps, 1))

    folder = output_dir / "model"
    frozen = {True: "all", False: "none"}[freeze_encoder] if isinstance(freeze_encoder, bool) else freeze_encoder
    command = (
        f"scalevae quickstart --collapse_strategy {collapse_strategy} --max_steps {steps} --seed {seed} "
        f"--learning_rate {learning_rate:g} --des_std {des_std:g} --freeze_encoder {frozen} "
        f"--decoder_vocab_size {decoder_vocab_size} --batch_size {batch_size}"
    )
    corpus = "embedded default corpus (Python standard library docstrings, scalevae/corpus)"
    training = dict(
        data=f"{data_files['train'] if data_files else corpus}, {len(dataset['train'])} training sentences",
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        learning_rate=learning_rate,
        lr_schedule=f"constant after {warmup_steps} warm-up steps",
        seed=seed,
        truncated=truncation["train"],
        command=command,
        decoder_tokenizer=f"byte-level BPE, {len(decoder_tokenizer)} tokens, fitted to the training text",
        evaluation=f"{len(test)} test sentences, {num_importance_samples} importance samples",
        training_time=f"{train_seconds:.0f} s ({timing['seconds_per_step']:.2f} s/step) on {describe_device()}",
    )
    save_model(folder, model, encoder_tokenizer, decoder_tokenizer, metrics=metrics, training=training)

    with torch.no_grad():
        latents = torch.cat(
            [
                model.encode(b["input_ids"].to(model.device), b["attention_mask"].to(model.device)).decoder_mu
                for b in loader
            ]
        ).cpu()
    lengths = torch.tensor([len(labels) for labels in test["labels"]], dtype=torch.float)
    return dict(
        model=model,
        tokenizers=(encoder_tokenizer, decoder_tokenizer),
        metrics=metrics,
        timing=timing,
        test_texts=raw["test"]["text"],
        lengths=lengths,
        samples=samples,
        max_length=max_length,
        history=trainer.state.log_history,
        latents=latents,
        folder=folder,
    )


def prior_samples(model, tokenizers, num_samples: int, seed: int, max_length: int = 32) -> list[str]:
    generator = torch.Generator(device=model.device).manual_seed(seed)  # the latents
    torch.manual_seed(seed)  # the tokens: generate() samples from the global generator
    return LatentText(model, *tokenizers, max_length=max_length).sample(num_samples, generator=generator, **NUCLEUS)


def distinct_bigrams(texts: list[str]) -> float:
    """Distinct-2 (Li et al. 2016): distinct word bigrams / all word bigrams over `texts`."""
    bigrams = [pair for text in texts for pair in zip(text.split(), text.split()[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def longest_repeat(tokens: list) -> int:
    """The longest run of one token repeated back to back ([5, 7, 7, 7] → 3)."""
    longest, run = 0, 0
    for i, token in enumerate(tokens):
        run = run + 1 if i and token == tokens[i - 1] else 1
        longest = max(longest, run)
    return longest


def describe_device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def format_table(results: dict[str, dict]) -> str:
    runs = list(results)
    header = f"{'held-out test set':36}" + "".join(f"{NAMES.get(run, run):>12}" for run in runs)
    lines = [header, "-" * len(header)]
    for key in TABLE_ROWS:
        info = METRICS[key]
        values = [{**results[run]["metrics"], **results[run]["timing"]}.get(key) for run in runs]
        cells = (f"{format(v, info.format):>12}" if v is not None else f"{'-':>12}" for v in values)
        lines.append(f"{info.label:36}" + "".join(cells))
    return "\n".join(lines)


def show_examples(result: dict, seed: int) -> tuple[str, list[str]]:
    """Held-out reconstructions, prior samples and an interpolation between two test sentences; also every printed
    generated line (for the repetition check)."""
    model, tokenizers, texts = result["model"], result["tokenizers"], result["test_texts"]
    text = LatentText(model, *tokenizers, max_length=result["max_length"])
    sources = texts[: SHOWN["reconstructions"]]
    reconstructions = text.reconstruct(sources, **GREEDY)
    samples = result["samples"][: SHOWN["samples"]]
    ends = texts[SHOWN["reconstructions"] : SHOWN["reconstructions"] + 2]
    path = text.interpolate(*ends, steps=SHOWN["interpolation"], **GREEDY)
    # One line each: an undertrained decoder may write newlines or tabs, which would break the layout.
    reconstructions, samples, path = (
        [" ".join(line.split()) for line in lines] for lines in (reconstructions, samples, path)
    )
    prior = "fitted" if model.config.prior == "fitted" else "N(0, diag f²)"
    lines = ["Reconstructions of test sentences (greedy, from the posterior mean):"]
    for source, output in zip(sources, reconstructions):
        lines += [f"  in : {source}", f"  out: {output}"]
    lines.append(f"Samples from the {prior} prior (nucleus sampling, top_p=0.9):")
    lines += [f"  - {s}" for s in samples]
    lines.append("Interpolation between two test sentences (greedy):")
    lines += [f"  {i}. {s}" for i, s in enumerate(path)]
    return "\n".join(lines), [*reconstructions, *samples, *path]


def explain(metrics: dict) -> str:
    """What the examples show, in two sentences."""
    return (
        "The reconstructions keep the gist of a sentence (its length, opening and register) rather than its words: "
        f"the decoder's latent holds at most {metrics['decoder_kl']:.0f} nats about a sentence (its KL to the prior "
        f"bounds the information), while its words still cost {metrics['reconstruction_nll']:.0f} nats to write.\n"
        "For more faithful reconstructions, give the latent more room (a larger --des_std, or a KL budget such as "
        "free bits) and train longer (--train_minutes), ideally on a GPU, which fits many more steps in the same time."
    )


def contrast(results: dict[str, dict]) -> str | None:
    """Scale-VAE against the plain VAE in one line, when both ran."""
    if not {"scale", "vae"} <= set(results):
        return None
    s, v = results["scale"]["metrics"], results["vae"]["metrics"]
    return (
        f"Scale-VAE vs VAE: MI {s['mi_decoder']:.2f} vs {v['mi_decoder']:.2f} nats, AU {s['au_decoder']} vs "
        f"{v['au_decoder']}, shuffled-z gap {s['shuffle_gap']:.1f} vs {v['shuffle_gap']:.1f} nats: "
        + (
            "the VAE's decoder ignores z (posterior collapse)."
            if v["au_decoder"] == 0 or v["shuffle_gap"] < 1
            else "both decoders use z."
        )
    )


def run(
    output_dir: str = "outputs/quickstart",
    collapse_strategy: str = "scale",
    compare_vae: bool = False,
    data_files: dict[str, str] | None = None,
    train_sentences: int | None = None,
    train_minutes: float = 7.0,
    max_steps: int | None = None,
    batch_size: int = 32,
    max_length: int = 32,
    latent_size: int = 32,
    learning_rate: float = 5e-4,
    warmup_steps: int = 50,
    num_importance_samples: int = 10,
    eval_sentences: int = 200,
    seed: int = 0,
    logging_steps: int = 25,
    freeze_encoder: bool | int = True,
    decoder_vocab_size: int = 4096,
    des_std: float = 1.0,
    encoder: str | None = None,
) -> dict[str, dict]:
    """Train (for `train_minutes` of wall-clock time each, or exactly `max_steps` steps), evaluate, print, plot, save.

    The printout before the table is a few lines and two progress bars per run; the same seed on the same machine gives
    the same printout whenever the clock stops at the same step (pass `--max_steps` to fix it)."""
    output = Path(output_dir)
    strategies = [collapse_strategy] + (["vae"] if compare_vae and collapse_strategy != "vae" else [])
    if isinstance(freeze_encoder, bool):
        frozen = "frozen" if freeze_encoder else "trained"
    else:
        frozen = f"embeddings and {freeze_encoder} lower layers frozen"
    length = f"{max_steps} steps" if max_steps else f"{train_minutes:g} min"
    corpus = data_files["train"] if data_files else "the embedded corpus"
    encoder_name = Path(encoder).name if encoder else "MiniLM-L6"
    print(
        f"scalevae quickstart: {', '.join(NAMES.get(s, s) for s in strategies)} on {corpus}, {length} of "
        f"training each on {describe_device()}.\nEncoder: pretrained {encoder_name} ({frozen}); decoder: a new "
        f"4x256 GPT-2 writing a {decoder_vocab_size}-token byte-level BPE fitted to the training text; latent "
        f"{latent_size}, "
        f"des_std {des_std:g}, batch {batch_size}, constant learning rate {learning_rate:g} after {warmup_steps} "
        "warm-up steps.",
        flush=True,
    )
    results = {}
    with quiet():
        for strategy in strategies:
            results[strategy] = train_and_evaluate(
                output / strategy,
                data_files,
                train_sentences,
                strategy,
                train_minutes * 60,
                max_steps,
                batch_size,
                max_length,
                latent_size,
                learning_rate,
                warmup_steps,
                num_importance_samples,
                eval_sentences,
                seed,
                logging_steps,
                freeze_encoder,
                decoder_vocab_size,
                des_std,
                encoder,
            )
    main = results[collapse_strategy]
    examples, printed = show_examples(main, seed)
    printed_ids = main["tokenizers"][1](printed, add_special_tokens=False)["input_ids"]
    main["metrics"]["longest_repeat"] = max(longest_repeat(ids) for ids in printed_ids)
    table = format_table(results)
    notes = [explain(main["metrics"]), contrast(results)]
    if collapse_strategy == "scale" and not compare_vae:
        notes.append("Add --compare_vae to train a plain VAE the same way and see its posterior collapse beside.")
    report = "\n\n".join([table, examples, "\n".join(n for n in notes if n)])
    print("\n" + report)
    curves = plot_training_curves(
        {NAMES.get(s, s): r["history"] for s, r in results.items()}, output / "training_curves.png"
    )
    latent_map = plot_latent_map(
        {NAMES.get(s, s): r["latents"] for s, r in results.items()},
        output / "latent_map.png",
        colors=main["lengths"],
        color_label="sentence length (tokens)",
    )
    summary = {s: {**r["metrics"], **r["timing"]} for s, r in results.items()}
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    (output / "results.md").write_text(f"```\n{report}\n```\n")
    steps = ", ".join(
        f"{NAMES.get(s, s)} {r['timing']['steps']} steps in {r['timing']['train_seconds']:.0f} s"
        for s, r in results.items()
    )
    print(
        f"\nTrained {steps}. Saved: {', '.join(str(r['folder']) for r in results.values())}; plots {curves}, "
        f"{latent_map}; metrics {output / 'results.json'}"
    )
    return results
