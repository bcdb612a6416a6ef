"""`scalevae compare`: the paper's comparison of posterior-collapse remedies, with seeds, on one corpus.

Every run shares the encoder, the decoder's size, the decoder tokenizer, the data, the steps, the optimizer and the
seeds; only the remedy differs. Each trained model is evaluated on the validation and the test split under both
generative priors (`"fitted"` and `"scaled"`, from the same importance samples). Results land one JSON per run in
`OUTPUT/runs/` as soon as the run ends, so an interrupted comparison resumes where it stopped; the table (Markdown,
mean ± sd over seeds), the summary JSON and the PNGs are rewritten from those files at the end.

The Scale-VAE des_std sweep chooses its best value on validation IW-NLL (fitted prior) and reports that run on test.
"""

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import PrinterCallback, TrainingArguments, set_seed

from .metrics import metric_info

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# name -> (ScaleVAEConfig fields, KL schedule). The des_std sweep adds "scale_<des_std>" runs.
BASELINES = {
    "vae": (dict(collapse_strategy="vae"), "constant"),
    "vae_cyclical": (dict(collapse_strategy="vae"), "cyclical"),
    "free_bits": (dict(collapse_strategy="free_bits", free_bits=0.5), "constant"),
    "bn": (dict(collapse_strategy="bn", bn_gamma=0.5), "constant"),
    "ae": (dict(collapse_strategy="ae"), "constant"),
    "scale_epoch": (
        dict(collapse_strategy="scale", scale_target_std=1.0, scale_schedule="epoch", scale_freeze_epochs=1),
        "constant",
    ),
}
DES_STD_SWEEP = (0.25, 0.5, 0.75, 1.0, 1.5)


@dataclass
class Preset:
    """One comparison's data and budget. Paths are relative to `data_dir` (default: ../shared/data)."""

    name: str
    train_file: str
    validation_file: str
    test_file: str
    train_sentences: int | None = None
    eval_sentences: int = 500
    label_suffix: str | None = None  # "label": FILE.label holds one class per line (linear-probe column)
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 5e-4
    max_length: int = 32
    latent_size: int = 32
    decoder_vocab_size: int = 4096
    decoder: dict = field(default_factory=lambda: dict(n_layer=2, n_embd=256, n_head=4))
    freeze_encoder: bool | int = True
    # A new BERT of this size on the fitted tokenizer, trained from scratch, instead of the pretrained MiniLM (whose
    # forward pass alone costs more than a whole step of the small model on 2 CPU cores).
    new_encoder: dict | None = None
    num_importance_samples: int = 50
    seeds: tuple[int, ...] = (0, 1)
    des_std_sweep: tuple[float, ...] = DES_STD_SWEEP


# The CPU presets' encoder: a 2x128 BERT trained from scratch on the fitted tokenizer.
_SMALL_ENCODER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
# What the GPU presets share: the default 4x256 decoder, the encoder trained, 3 seeds, k = 200.
_GPU = dict(
    max_steps=8000,
    batch_size=64,
    max_length=48,
    decoder=dict(n_layer=4, n_embd=256, n_head=4),
    freeze_encoder=False,
    num_importance_samples=200,
    seeds=(0, 1, 2),
)

PRESETS = {
    # 2 CPU cores, in the background: about 80 minutes for 11 runs x 2 seeds (measured: see README).
    # 12,000 training sentences make 375 steps an epoch, so the f_epo = 1 schedule freezes its factors mid-run.
    "ptb-cpu": Preset(
        "ptb-cpu",
        "ptb.train.txt",
        "ptb.valid.txt",
        "ptb.test.txt",
        train_sentences=12000,
        eval_sentences=300,
        max_steps=500,
        num_importance_samples=30,
        seeds=(0, 1),
        new_encoder=_SMALL_ENCODER,
        freeze_encoder=False,
    ),
    # Representation: sentiment probe of the latents (labels only at evaluation), 1 seed, the main remedies.
    "yelp-cpu": Preset(
        "yelp-cpu",
        "yelp_sentiment.train.txt",
        "yelp_sentiment.valid.txt",
        "yelp_sentiment.test.txt",
        eval_sentences=1000,
        label_suffix="label",
        max_steps=400,
        num_importance_samples=10,
        seeds=(0,),
        des_std_sweep=(1.0,),
        new_encoder=_SMALL_ENCODER,
        freeze_encoder=False,
    ),
    # One H100 (untested: no GPU was lent to the session that wrote them). Sized from issue 8's measured H100 step,
    # 37-45 ms at batch 32-256: 8,000 steps are about 5-6 minutes, then the evaluation, under 8 minutes per run.
    "ptb-gpu": Preset("ptb-gpu", "ptb.train.txt", "ptb.valid.txt", "ptb.test.txt", eval_sentences=3000, **_GPU),
    "snli-gpu": Preset("snli-gpu", "snli.train.txt", "snli.valid.txt", "snli.test.txt", eval_sentences=3000, **_GPU),
    # Yahoo ships validation and test only: as ../shared/data/README.md advises, yahoo.valid.txt's first 9,000
    # documents train and its last 1,000 validate; yahoo.test.txt tests.
    "yahoo-gpu": Preset(
        "yahoo-gpu",
        "yahoo.valid.txt",
        "yahoo.valid.txt",
        "yahoo.test.txt",
        eval_sentences=1000,
        **{**_GPU, "max_length": 64},
    ),
}

# Columns of the table, keys of a run's test metrics (`_fitted`/`_scaled`: the two priors); headers and formats come
# from `scalevae.metrics.METRICS`.
COLUMNS = (
    "nll_fitted",
    "nll_scaled",
    "ppl_fitted",
    "ppl_scaled",
    "elbo_fitted",
    "elbo_scaled",
    "reconstruction_nll",
    "kl",
    "decoder_kl_fitted",
    "mi",
    "mi_decoder",
    "au",
    "au_decoder",
    "token_accuracy",
    "bleu",
    "shuffle_gap",
    "probe_mu",
    "probe_decoder_mu",
    "seconds_per_step",
)


def run_names(preset: Preset) -> list[str]:
    names = list(BASELINES) + [f"scale_{des_std:g}" for des_std in preset.des_std_sweep]
    if preset.label_suffix:  # the representation preset: the remedies, not the schedule variants
        names = [n for n in names if n not in ("vae_cyclical", "scale_epoch")]
    return names


def run_settings(name: str) -> tuple[dict, str]:
    if name in BASELINES:
        return BASELINES[name]
    if name.startswith("scale_"):
        return dict(collapse_strategy="scale", scale_target_std=float(name[len("scale_") :])), "constant"
    raise ValueError(f"Unknown run {name!r}: one of {list(BASELINES)} or scale_<des_std>.")


# ---------------------------------------------------------------------------------------------------------------------
# Data shared by every run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ComparisonData:
    encoder_tokenizer: object
    decoder_tokenizer: object
    dataset: object  # DatasetDict: train, validation, test (tokenised)
    encoder: str | None  # the encoder every run starts from (a path or Hub id; None: the offline MiniLM)
    texts: dict  # split -> raw texts (validation/test, for BLEU)
    labels: dict  # split -> class labels (validation/test), or {}
    collator: object


def _read_lines(path: Path, limit: int | None = None) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    return lines[:limit] if limit else lines


def prepare_data(preset: Preset, data_dir: Path, encoder: str | None, work_dir: Path) -> ComparisonData:
    import datasets
    from transformers import AutoTokenizer

    from .data import DataCollatorForLatentLM, tokenize_dataset
    from .factory import fit_decoder_tokenizer, offline_encoder_path, prepare_decoder_tokenizer

    files = dict(train=preset.train_file, validation=preset.validation_file, test=preset.test_file)
    for split, name in files.items():
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"The {preset.name} preset's {split} file {data_dir / name} is missing.")
    train = _read_lines(data_dir / files["train"])
    held_out = preset.validation_file == preset.train_file  # the last eval_sentences lines validate
    if held_out:
        train, validation = train[: -preset.eval_sentences], train[-preset.eval_sentences :]
    texts = {"train": train[: preset.train_sentences] if preset.train_sentences else train}
    labels = {}
    for split in ("validation", "test"):
        lines = validation if split == "validation" and held_out else _read_lines(data_dir / files[split])
        texts[split] = lines[: preset.eval_sentences]
        if preset.label_suffix:
            label_path = (data_dir / files[split]).with_suffix(f".{preset.label_suffix}")
            split_labels = _read_lines(label_path)
            if len(split_labels) < len(texts[split]):
                raise ValueError(f"{label_path} has fewer lines than {files[split]}.")
            labels[split] = split_labels[: len(texts[split])]
    decoder_tokenizer = prepare_decoder_tokenizer(fit_decoder_tokenizer(texts["train"], preset.decoder_vocab_size))
    if preset.new_encoder and encoder is None:
        encoder = str(_new_encoder(preset, decoder_tokenizer, work_dir / "encoder"))
    encoder_tokenizer = AutoTokenizer.from_pretrained(encoder or offline_encoder_path())
    raw = datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": t}) for split, t in texts.items()})
    dataset, _ = tokenize_dataset(raw, encoder_tokenizer, decoder_tokenizer, preset.max_length)
    collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    return ComparisonData(encoder_tokenizer, decoder_tokenizer, dataset, encoder, texts, labels, collator)


def _new_encoder(preset: Preset, tokenizer, folder: Path) -> Path:
    """A randomly initialised BERT (seed 0) on the fitted tokenizer, saved once: every run starts from it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max(64, preset.max_length),
        **preset.new_encoder,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# One run: train, fit the prior, evaluate on validation and test
# ---------------------------------------------------------------------------------------------------------------------


def train_and_evaluate(name: str, seed: int, preset: Preset, data: ComparisonData, work_dir: Path) -> dict:
    from .factory import build_model
    from .metrics import evaluate_model, linear_probe_accuracy, reconstruction_bleu_of
    from .training import KLSchedule, make_trainer

    config_fields, kl_schedule = run_settings(name)
    set_seed(seed)
    model, _, _ = build_model(
        data.encoder,
        decoder_tokenizer=data.decoder_tokenizer,
        decoder_config_overrides=preset.decoder,
        latent_size=preset.latent_size,
        freeze_encoder=preset.freeze_encoder,
        prior="fitted",
        **config_fields,
    )
    args = TrainingArguments(
        output_dir=str(work_dir / "trainer"),
        max_steps=preset.max_steps,
        per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=preset.learning_rate,
        warmup_steps=max(1, preset.max_steps // 20),
        lr_scheduler_type="constant_with_warmup",
        weight_decay=0.0,
        logging_steps=max(1, preset.max_steps // 12),
        report_to=[],
        save_strategy="no",
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    schedule = KLSchedule(kl_schedule, 1.0, total_steps=preset.max_steps)
    trainer = make_trainer(
        model,
        args,
        data.dataset["train"],
        data.collator,
        eval_dataset=data.dataset["validation"],
        kl_schedule=schedule,
        probe_size=128,
    )
    trainer.remove_callback(PrinterCallback)  # the run-level progress bar is the output; curves go to the JSON
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    result = dict(
        run=name,
        seed=seed,
        preset=preset.name,
        steps=trainer.state.global_step,
        seconds_per_step=seconds / max(1, trainer.state.global_step),
        history=[h for h in trainer.state.log_history if "loss" in h],
    )
    for split in ("validation", "test"):
        loader = DataLoader(data.dataset[split], batch_size=32, collate_fn=data.collator)
        metrics = evaluate_model(
            model,
            loader,
            num_importance_samples=preset.num_importance_samples,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
            priors=("fitted", "scaled"),
        )
        metrics["bleu"] = reconstruction_bleu_of(
            model, data.texts[split][:200], data.encoder_tokenizer, data.decoder_tokenizer, preset.max_length
        )
        if data.labels:
            mu, decoder_mu = _posterior_means(model, loader)
            metrics["probe_mu"] = linear_probe_accuracy(mu, data.labels[split], seed=seed)
            metrics["probe_decoder_mu"] = linear_probe_accuracy(decoder_mu, data.labels[split], seed=seed)
        result[split] = metrics
    return result


@torch.no_grad()
def _posterior_means(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    mus, decoder_mus = [], []
    for batch in loader:
        posterior = model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        mus.append(posterior.mu.float().cpu())
        decoder_mus.append(posterior.decoder_mu.float().cpu())
    return torch.cat(mus), torch.cat(decoder_mus)


# ---------------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------------


def run_comparison(
    preset: str | Preset = "ptb-cpu",
    output_dir: str | Path = "outputs/compare",
    data_dir: str | Path | None = None,
    encoder: str | None = None,
    runs: list[str] | None = None,
    seeds: list[int] | None = None,
    max_steps: int | None = None,
) -> dict:
    """Train and evaluate every run × seed not already in `output_dir/runs/`, then write the table, JSON and PNGs
    over every finished run in the folder (a later call with other `seeds` or `runs` adds to it). Returns the
    summary (see `summarize`)."""
    from tqdm.auto import tqdm

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if max_steps is not None:
        preset = replace(preset, max_steps=max_steps)
    if seeds:
        preset = replace(preset, seeds=tuple(seeds))
    names = runs or run_names(preset)
    for name in names:
        run_settings(name)  # unknown names fail before any training
    output = Path(output_dir)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    settings_file = output / "preset.json"
    settings = {k: v for k, v in asdict(preset).items() if k not in ("seeds", "des_std_sweep")}
    if settings_file.exists() and json.loads(settings_file.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(
            f"{output} holds a comparison with other settings ({settings_file}); resume it with the same preset and "
            "options, or choose another --output_dir."
        )
    settings_file.write_text(json.dumps(settings, indent=2))

    todo = [(name, seed) for seed in preset.seeds for name in names]
    data = None
    progress = tqdm(todo, desc=f"compare {preset.name}", unit="run")
    for name, seed in progress:
        path = output / "runs" / f"{name}-seed{seed}.json"
        if path.exists():
            continue
        progress.set_postfix_str(f"{name} seed {seed}")
        if data is None:
            data = prepare_data(preset, Path(data_dir) if data_dir else SHARED_DATA, encoder, output / "work")
        result = train_and_evaluate(name, seed, preset, data, output / "work")
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(_to_json(result, indent=1))
        temporary.replace(path)  # a killed run leaves no half-written result behind
    # The table covers every finished run in the folder, so seeds added later for a subset of runs join it.
    results = [json.loads(path.read_text()) for path in sorted((output / "runs").glob("*-seed*.json"))]
    results.sort(
        key=lambda r: (
            list(BASELINES).index(r["run"]) if r["run"] in BASELINES else len(BASELINES),
            r["run"],
            r["seed"],
        )
    )
    summary = summarize(results, preset)
    (output / "results.json").write_text(_to_json(summary, indent=2))
    (output / "results.md").write_text(format_markdown(summary))
    from .plots import plot_comparison

    plot_comparison(results, summary, output)
    return summary


def _to_json(value, **kwargs) -> str:
    """Strict JSON: an undefined figure (NaN, e.g. the AE's density) is written as null."""

    def clean(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], preset: Preset) -> dict:
    """Per run: mean and sd over seeds of every test (and validation) figure; the best des_std on validation."""
    by_run = {}
    for result in results:
        by_run.setdefault(result["run"], []).append(result)
    table = {}
    for name, runs in by_run.items():
        row = {}
        for split in ("validation", "test"):
            keys = runs[0][split].keys()
            row[split] = {
                k: _mean_sd([r[split][k] for r in runs])
                for k in keys
                if isinstance(runs[0][split][k], (int, float, type(None)))
            }
        row["test"]["seconds_per_step"] = _mean_sd([r["seconds_per_step"] for r in runs])
        row["seeds"] = sorted(r["seed"] for r in runs)
        table[name] = row
    sweep = [n for n in table if n.startswith("scale_") and n != "scale_epoch"]
    best, lowest = choose_des_std(table, sweep)
    return dict(preset=asdict(preset), runs=table, best_scale=best, lowest_nll_scale=lowest)


def choose_des_std(table: dict, sweep: list[str]) -> tuple[str | None, str | None]:
    """Scale-VAE's des_std, chosen on validation only. `best`: the run whose decoder's latent carries the most
    information (MI) among those whose IW-NLL (fitted prior) is within 1% of the plain VAE's, the comparison the
    paper's claim is about; without a VAE run, or if none is within 1%, the lowest IW-NLL. `lowest`: the lowest
    IW-NLL, whatever its MI."""
    if not sweep:
        return None, None
    nll = {n: table[n]["validation"]["nll_fitted"][0] for n in sweep}
    lowest = min(sweep, key=nll.get)
    if "vae" not in table:
        return lowest, lowest
    budget = 1.01 * table["vae"]["validation"]["nll_fitted"][0]
    within = [n for n in sweep if nll[n] <= budget]
    best = max(within, key=lambda n: table[n]["validation"]["mi_decoder"][0]) if within else lowest
    return best, lowest


# The README's narrower table: density under both priors, and whether the latent is used.
README_COLUMNS = (
    "nll_fitted",
    "nll_scaled",
    "reconstruction_nll",
    "kl",
    "decoder_kl_fitted",
    "mi_decoder",
    "au",
    "au_decoder",
    "shuffle_gap",
    "bleu",
)


def format_markdown(summary: dict, keys: tuple[str, ...] | None = None) -> str:
    """The comparison table (every column of `COLUMNS` that was measured, or those named in `keys`)."""
    preset = summary["preset"]
    runs = summary["runs"]
    columns = [
        (key, metric_info(key).name, ".1f" if metric_info(key).format == "d" else metric_info(key).format)  # means
        for key in COLUMNS
        if any(key in row["test"] for row in runs.values()) and (not keys or key in keys)
    ]
    lines = [
        f"Comparison `{preset['name']}`: test split, mean ± sd over the seeds in the `seeds` column; "
        f"{preset['max_steps']} steps of batch {preset['batch_size']}, k = {preset['num_importance_samples']} "
        f"importance samples. Scale-VAE's des_std, chosen on validation: `{summary['best_scale']}` (most MI of the "
        f"decoder's latent within 1% of the VAE's IW-NLL); lowest validation IW-NLL: "
        f"`{summary.get('lowest_nll_scale')}`.",
        "",
        "| run | seeds | " + " | ".join(header for _, header, _ in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for name, row in runs.items():
        cells = []
        for key, _, fmt in columns:
            mean, sd = row["test"].get(key, (float("nan"), float("nan")))
            spread = f" ± {sd:{fmt}}" if len(row["seeds"]) > 1 else ""
            cells.append("–" if math.isnan(mean) else f"{mean:{fmt}}{spread}")
        marker = " (chosen)" if name == summary["best_scale"] else ""
        seeds = ",".join(str(seed) for seed in row["seeds"])
        lines.append(f"| {name}{marker} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
