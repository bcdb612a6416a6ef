"""The main job: train a Scale-VAE on the embedded default corpus, offline, within a wall-clock budget, and show what
it learned: a metrics table (with a plain VAE beside it on request), reconstructions, prior samples, an interpolation,
PNG plots and a Hub-ready model folder. A preset of the run recipe (`scalevae.recipe`) plus its printing.

Choices (measured in docs/quickstart.md): the decoder writes with a byte-level BPE fitted to the training text (4,096
tokens) rather than the encoder's 30k WordPiece vocabulary, and the pretrained MiniLM encoder is frozen (only the latent
head and the decoder train), which fits 1.7 times the steps into the budget. The learning rate is constant after a
short warm-up, so a run stopped by the clock at step N is the run `--max_steps N` gives, step for step.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .card import describe_device
from .claims import distinct_n, repetition_rate
from .latent import LatentText, posterior_means
from .metrics import METRICS, PRIOR_NAMES
from .options import SMALL_RUN_DEFAULTS
from .outputs import write_atomically
from .plots import plot_latent_map, plot_training_curves
from .recipe import RunSpec, run

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
    "printed_repetition",
)
NAMES = {"scale": "Scale-VAE", "vae": "VAE", "free_bits": "free bits", "bn": "BN-VAE", "ae": "AE"}
SHOWN = dict(reconstructions=3, samples=4, interpolation=5)
PRIOR_SAMPLES = 20
# Printed text is decoded as the README shows it: greedy for reconstructions and interpolations, nucleus sampling for
# prior samples, always blocking repeated trigrams (a short-trained decoder otherwise loops on frequent words).
GREEDY = dict(do_sample=False, no_repeat_ngram_size=3)
NUCLEUS = dict(do_sample=True, top_p=0.9, no_repeat_ngram_size=3)


DEFAULT_STEPS = 1500
# The main job's preset: option -> default (every other option keeps the recipe's default).
QUICKSTART = dict(
    SMALL_RUN_DEFAULTS,
    output_dir="outputs/quickstart",
    # A fixed number of steps, so the result does not follow the machine's load (README: the time it takes);
    # --train_minutes adds a wall-clock budget, and whichever comes first stops training.
    max_steps=DEFAULT_STEPS,
    train_minutes=None,
    warmup_steps=50,
    logging_steps=25,
    seed=0,
    num_importance_samples=10,
    eval_sentences=200,
    freeze_encoder=True,
    # Chosen by the main job's targets (docs/quickstart.md): 2.0 reaches BLEU 7.0 with nothing printed stuttering under
    # the memory injection; 1.0 stays at 4.1.
    scale_target_std=2.0,
    # The prior that samples come from is refitted when training ends, on 1,024 sentences' posteriors (each a whole
    # Gaussian, so its full covariance is well conditioned) in a quarter of the default's time on a CPU.
    prior_fit_sentences=1024,
    report_to=["tensorboard"],
    save_strategy="no",
)


@dataclass
class QuickstartArguments:
    compare_vae: bool = field(default=False, metadata={"help": "also train a plain VAE and print it beside"})


def prior_samples(model, tokenizers, num_samples: int, seed: int, max_length: int = 32) -> list[str]:
    generator = torch.Generator(device=model.device).manual_seed(seed)  # the latents
    torch.manual_seed(seed)  # the tokens: generate() samples from the global generator
    return LatentText(model, *tokenizers, max_length=max_length).sample(num_samples, generator=generator, **NUCLEUS)


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
    lines = ["Reconstructions of test sentences (greedy, from the posterior mean):"]
    for source, output in zip(sources, reconstructions):
        lines += [f"  in : {source}", f"  out: {output}"]
    lines.append(f"Samples from the {PRIOR_NAMES[model.config.prior]} (nucleus sampling, top_p=0.9):")
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
        "free bits) and train longer (--max_steps), ideally on a GPU, which fits many more steps in the same time."
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


def quickstart_spec(argv: list[str]) -> tuple[RunSpec, bool]:
    """The spec of `scalevae quickstart ARGV`, and whether to add a plain VAE beside."""
    spec, given, (options,) = RunSpec.parse(
        argv, QUICKSTART, (QuickstartArguments,), "quickstart", prog="scalevae quickstart", description=__doc__
    )
    return spec, options.compare_vae


def describe(spec: RunSpec, strategies: list[str]) -> str:
    frozen = spec.config.get("freeze_encoder")
    frozen = {True: "frozen", False: "trained"}.get(frozen, f"embeddings and {frozen} lower layers frozen")
    training = spec.training
    length = f"{training.max_steps} steps" + (
        f" (or {spec.run.train_minutes:g} min, whichever comes first)" if spec.run.train_minutes is not None else ""
    )
    encoder = Path(spec.model.encoder).name if spec.model.encoder else "MiniLM-L6"
    return (
        f"scalevae quickstart: {', '.join(NAMES.get(s, s) for s in strategies)} on "
        f"{spec.data.train_file or 'the embedded corpus'}, {length} of training each on {describe_device()}.\n"
        f"Encoder: pretrained {encoder} ({frozen}); decoder: a new {spec.model.decoder_layers}x"
        f"{spec.model.decoder_width} GPT-2 writing a {spec.model.decoder_vocab_size}-token byte-level BPE fitted to "
        f"the training text; latent {spec.config['latent_size']}, des_std {spec.config['scale_target_std']:g}, batch "
        f"{training.per_device_train_batch_size}, constant learning rate {training.learning_rate:g} after "
        f"{training.warmup_steps} warm-up steps."
    )


def main(argv: list[str]) -> dict[str, dict]:
    """`scalevae quickstart`: train (`--max_steps` steps each, or less when a `--train_minutes` budget runs out first),
    evaluate, print, plot, save.

    The printout before the table is a few lines and two progress bars per run; the same seed on the same machine gives
    the same printout."""
    spec, compare_vae = quickstart_spec(argv)
    output = spec.output_dir
    main_strategy = spec.config["collapse_strategy"]
    strategies = [main_strategy] + (["vae"] if compare_vae and main_strategy != "vae" else [])
    print(describe(spec, strategies), flush=True)
    results, data = {}, None
    for strategy in strategies:
        strategy_spec = spec.replace({"collapse_strategy": strategy}, training=dict(output_dir=str(output / strategy)))
        # The card's command reproduces this run: its own strategy (the clock's step count is added by `run`).
        command = " ".join(["scalevae quickstart", *argv, "--collapse_strategy", strategy]).replace(
            " --compare_vae", ""
        )
        result = run(strategy_spec, data, command=command, desc=f"train {NAMES.get(strategy, strategy)}")
        data = result.data  # the plain VAE trains on the same tokenised data
        results[strategy] = summarize_run(result, spec)
    main = results[main_strategy]
    examples, printed = show_examples(main, spec.training.seed)
    main["metrics"]["printed_repetition"] = repetition_rate(printed)
    table = format_table(results)
    notes = [explain(main["metrics"]), contrast(results)]
    if main_strategy == "scale" and not compare_vae:
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
    write_atomically(output / "results.json", json.dumps(summary, indent=2))
    write_atomically(output / "results.md", f"```\n{report}\n```\n")
    steps = ", ".join(
        f"{NAMES.get(s, s)} {r['timing']['steps']} steps in {r['timing']['train_seconds']:.0f} s"
        for s, r in results.items()
    )
    print(
        f"\nTrained {steps}. Saved: {', '.join(str(r['folder']) for r in results.values())}; plots {curves}, "
        f"{latent_map}; metrics {output / 'results.json'}"
    )
    short = [s for s, r in results.items() if r["timing"]["steps"] < spec.training.max_steps]
    if short:
        print(
            f"Note: --train_minutes stopped {', '.join(NAMES.get(s, s) for s in short)} before the "
            f"{spec.training.max_steps} steps asked for ({results[short[0]]['timing']['steps']} trained): the "
            "figures above are for fewer steps than docs/quickstart.md's, and the reconstructions are poorer for "
            "it. Without --train_minutes the run trains every step, however busy the machine."
        )
    return results


def summarize_run(result, spec: RunSpec) -> dict:
    """What the printout needs of one run: its test figures, prior samples and their diversity, the test latents."""
    data, model = result.data, result.model
    tokenizers = (data.encoder_tokenizer, data.decoder_tokenizer)
    metrics = dict(result.metrics["test"])
    samples = prior_samples(model, tokenizers, PRIOR_SAMPLES, spec.training.seed, spec.data.max_length)
    metrics["prior_distinct_2"] = distinct_n(samples, 2)
    _, latents = posterior_means(model, data.loader("test"))
    return dict(
        model=model,
        tokenizers=tokenizers,
        metrics=metrics,
        timing=dict(steps=result.steps, train_seconds=result.train_seconds, seconds_per_step=result.seconds_per_step),
        test_texts=data.texts["test"],
        lengths=torch.tensor([len(labels) for labels in data.dataset["test"]["labels"]], dtype=torch.float),
        samples=samples,
        max_length=spec.data.max_length,
        history=result.history,
        latents=latents,
        folder=result.folder,
    )
