"""`scalevae compare`: the paper's comparison of posterior-collapse remedies, with seeds, on one corpus.

Every run shares the encoder, the decoder's size, the decoder tokenizer, the data, the steps, the optimizer and the
seeds; only the remedy differs. Each trained model is evaluated on the validation and the test split under both
generative priors (`"fitted"` and `"scaled"`, from the same importance samples). Results land one JSON per run in
`OUTPUT/runs/` as soon as the run ends, so an interrupted comparison resumes where it stopped; the table (Markdown,
mean ± sd over seeds), the summary JSON and the PNGs are rewritten from those files at the end.

A preset is a set of defaults of the run recipe's options (`scalevae.recipe.RunSpec`): any option given overrides it, and
`--train_file/--validation_file/--test_file` run it on anyone's data. The des_std of Scale-VAE is chosen on validation
(`choose_des_std`).
"""

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import prepare_data
from .evaluation import text_classifier
from .metrics import metric_info
from .options import SEED_RANGE, SMALL_RUN_DEFAULTS, number
from .outputs import write_atomically
from .recipe import RunSpec, quiet, run

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


# A preset is a command line's defaults: option -> value (file names relative to --data_dir).
_CPU = dict(
    # A new 2x128 BERT on the fitted tokenizer, trained from scratch, instead of the pretrained MiniLM (whose forward
    # pass alone costs more than a whole step of the small model on 2 CPU cores).
    new_encoder_layers=2,
    new_encoder_width=128,
    new_encoder_heads=4,
    freeze_encoder=False,
    decoder_layers=2,
)
# What the GPU presets share: the default 4x256 decoder, the encoder trained, 3 seeds, k = 200.
_GPU = dict(
    max_steps=8000,
    per_device_train_batch_size=64,
    max_length=48,
    decoder_layers=4,
    freeze_encoder=False,
    num_importance_samples=200,
    eval_sentences=3000,
)
_COMMON = dict(
    SMALL_RUN_DEFAULTS,
    # The runs' own prior (prior samples, the prior cycle, `nll`) stays the diagonal one the tables in docs/ were
    # measured with, not the model's default "full"; density is reported under every family named in `priors`.
    prior="fitted",
    freeze_encoder=True,
    eval_sentences=500,
    num_importance_samples=50,
    eval_splits=["validation", "test"],
    priors=["fitted", "scaled"],
    claims=True,
    report_to=[],
    save_strategy="no",
    save=False,
)


def _files(stem: str, validation: str = "valid") -> dict:
    return dict(
        train_file=f"{stem}.train.txt", validation_file=f"{stem}.{validation}.txt", test_file=f"{stem}.test.txt"
    )


PRESETS = {
    # 2 CPU cores, in the background: about 2 minutes a run (measured: docs/compare.md).
    # 12,000 training sentences make 375 steps an epoch, so the f_epo = 1 schedule freezes its factors mid-run.
    "ptb-cpu": dict(
        _COMMON,
        **_CPU,
        **_files("ptb"),
        train_sentences=12000,
        eval_sentences=300,
        max_steps=500,
        num_importance_samples=30,
        # Every remedy scored under every prior of the family (the default is chosen on these validation figures).
        priors=["fitted", "full", "mixture", "scaled"],
        seeds=[0, 1],
    ),
    # Representation and control: sentiment probe and edits of the latents (labels only at evaluation), every run
    # but the f_epo variant.
    "yelp-cpu": dict(
        _COMMON,
        **_CPU,
        **_files("yelp_sentiment"),
        label_suffix="label",
        eval_sentences=2000,
        max_steps=400,
        control=True,
        num_importance_samples=10,
        # The reverse LM reads the 1,000 samples 6 times (about 25 s on 2 cores); longer, it learns them by heart.
        reverse_lm_steps=200,
        seeds=[0],
    ),
    # One H100 (untested: no GPU was lent to the sessions that wrote them). Sized from a measured H100 step,
    # 37-45 ms at batch 32-256: 8,000 steps are about 5-6 minutes, then the evaluation, under 8 minutes per run.
    "ptb-gpu": dict(_COMMON, **_GPU, **_files("ptb"), seeds=[0, 1, 2]),
    "snli-gpu": dict(_COMMON, **_GPU, **_files("snli", "valid"), seeds=[0, 1, 2]),
    # Yahoo ships validation and test only: as ../shared/data/README.md advises, yahoo.valid.txt's first 9,000
    # documents train and its last 1,000 validate; yahoo.test.txt tests.
    "yahoo-gpu": dict(
        _COMMON,
        **{**_GPU, "max_length": 64, "eval_sentences": 1000},
        train_file="yahoo.valid.txt",
        validation_file="yahoo.valid.txt",
        test_file="yahoo.test.txt",
        seeds=[0, 1, 2],
    ),
}


@dataclass
class CompareArguments:
    """What a comparison runs (the rest of the options are the run recipe's: `scalevae.recipe.RunSpec`)."""

    preset: str = field(default="ptb-cpu", metadata={"help": f"one of {', '.join(PRESETS)}: the options' defaults"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of the data files named relatively (default: ../shared/data)"}
    )
    runs: list[str] | None = field(
        default=None, metadata={"help": "a subset of the runs, e.g. vae bn scale_0.5 (default: the preset's)"}
    )
    seeds: list[int] = number(default_factory=lambda: [0], **SEED_RANGE, help="seeds of every run")
    des_std_sweep: list[float] = number(
        default_factory=lambda: list(DES_STD_SWEEP), low=0, high=1e3, low_open=True, help="the scale_<des_std> runs"
    )


# The table's columns, grouped by the paper's four claims (plus how much the latent is used); keys of a run's test
# metrics (`_fitted`/`_scaled`: the two priors). Headers and formats come from `scalevae.metrics.METRICS`.
CLAIMS = {
    "density estimation": (
        "nll_fitted", "nll_full", "nll_mixture", "nll_scaled", "ppl_fitted", "elbo_fitted", "elbo_scaled",
    ),
    "representation learning": (
        "probe_100_mu", "probe_1000_mu", "probe_10000_mu", "probe_mu", "probe_decoder_mu",
    ),
    "consistency of the latent space": (
        "consistency_prior_top1", "consistency_data_top1",
    ),
    "generation (nucleus-sampled prior samples) and the fluency of reconstructions": (
        "gen_forward_ppl", "gen_reverse_ppl", "gen_distinct_1", "gen_distinct_2", "gen_self_bleu", "gen_repetition",
        "gen_mean_length", "data_mean_length", "recon_ppl", "recon_repetition",
    ),
    "control (flipping the sentiment through the latent)": (
        "control_acc_at_bleu1", "control_strength50", "control_acc50", "control_bleu50", "control_ppl50",
        "control_repetition50", "control_acc@1.0", "control_bleu@1.0", "control_ppl@1.0", "control_repetition@1.0",
    ),
    "use of the latent": (
        "reconstruction_nll", "kl", "decoder_kl_fitted", "mi", "mi_decoder", "au", "au_decoder", "token_accuracy",
        "bleu", "shuffle_gap", "seconds_per_step",
    ),
}  # fmt: skip
COLUMNS = tuple(key for keys in CLAIMS.values() for key in keys)


def run_names(options: "CompareArguments", labelled: bool) -> list[str]:
    """The runs to train, each name normalised (`normalised_run_name`), checked before any training: an unknown name,
    a des_std out of range or two spellings of one run are refused at once."""
    if options.runs:
        names = [normalised_run_name(name) for name in options.runs]
        seen = {}
        for given, name in zip(options.runs, names):
            if name in seen:
                raise ValueError(f"--runs {seen[name]} and {given} are the same run ({name}): name each run once.")
            seen[name] = given
        return names
    names = list(BASELINES) + [f"scale_{des_std:g}" for des_std in options.des_std_sweep]
    if labelled:  # the representation preset: the main rows and the sweep, not the f_epo variant
        names = [n for n in names if n != "scale_epoch"]
    return names


# The des_std a scale_<des_std> run may take: below 1e-3 the latent's float32 statistics underflow (variances of
# 1e-18 and less), above 1e3 the config refuses it.
DES_STD_RANGE = (1e-3, 1e3)


def normalised_run_name(name: str) -> str:
    """A run's one spelling: a baseline's name, or scale_<des_std> with des_std written as `%g` (scale_1.0 and
    scale_1 are one run, scale_1); raises a ValueError for an unknown name or a des_std outside `DES_STD_RANGE`."""
    if name in BASELINES:
        return name
    if name.startswith("scale_"):
        try:
            value = float(name[len("scale_") :])
        except ValueError:
            value = None
        if value is not None:
            low, high = DES_STD_RANGE
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(
                    f"--runs {name}: des_std must be a finite number in [{low:g}, {high:g}], got {value!r}."
                )
            return f"scale_{value:g}"
    raise ValueError(f"Unknown run {name!r}: one of {list(BASELINES)} or scale_<des_std>.")


def run_settings(name: str) -> tuple[dict, str]:
    name = normalised_run_name(name)
    if name in BASELINES:
        return BASELINES[name]
    return dict(collapse_strategy="scale", scale_target_std=float(name[len("scale_") :])), "constant"


def comparison_spec(argv: list[str]) -> tuple[RunSpec, "CompareArguments"]:
    """The base spec of `scalevae compare ARGV` (every run is this spec with its remedy) and what to run: the preset's
    options are the parser's defaults, so any option given overrides them."""
    import argparse

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="ptb-cpu", choices=sorted(PRESETS))
    preset_name = first.parse_known_args(argv)[0].preset
    preset = dict(PRESETS[preset_name], output_dir=f"outputs/compare-{preset_name}")
    spec, given, (options,) = RunSpec.parse(
        argv, preset, (CompareArguments,), "compare", prog="scalevae compare", description=__doc__
    )
    data_dir = Path(options.data_dir) if options.data_dir else SHARED_DATA
    files = {}
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(spec.data, name)
        # The preset's file names are relative to --data_dir; files given on the command line are the user's own.
        if path and name not in given and not Path(path).is_absolute():
            path = str(data_dir / path)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"--{name} {path} does not exist.")
        files[name] = path
    steps = spec.training.max_steps  # every preset gives it; a value given is checked by RunSpec.parse
    derived = {}  # the schedule's warm-up and the logging interval follow the run's length unless given
    if "warmup_steps" not in given:
        derived["warmup_steps"] = max(1, steps // 20)
    if "logging_steps" not in given:
        derived["logging_steps"] = max(1, steps // 12)
    spec = spec.replace(data=files, training=derived)
    for name in run_names(options, bool(spec.data.label_suffix)):
        run_settings(name)  # unknown names fail before any training
    return spec, options


def train_and_evaluate(name: str, seed: int, spec: RunSpec, data, reference_lm=None, classifier=None) -> dict:
    """One run of the comparison: the base spec with this run's remedy and seed, on the shared data."""
    config_fields, kl_schedule = run_settings(name)
    run_spec = spec.replace(
        config_fields,
        model=dict(kl_schedule=kl_schedule),
        training=dict(seed=seed, output_dir=str(spec.output_dir / "work" / f"{name}-seed{seed}")),
    )
    started = time.perf_counter()
    result = run(
        run_spec, data, desc=f"{name} seed {seed}", progress=False, reference_lm=reference_lm, classifier=classifier
    )
    return dict(
        run=name,
        seed=seed,
        steps=result.steps,
        seconds_per_step=result.seconds_per_step,
        train_seconds=result.train_seconds,
        # Everything after training: the prior fit, every split's figures and the save; what a comparison costs.
        evaluate_seconds=time.perf_counter() - started - result.train_seconds,
        history=[h for h in result.history if "loss" in h],
        **result.metrics,
    )


# TrainingArguments that do not change a run's figures: where it writes, logs, reports and publishes, how it loads
# batches, how it evaluates during training, and the seed (each run has its own, from --seeds). Every other one does
# (optim, gradient_accumulation_steps, max_grad_norm, adam_beta2, ...), and is part of a comparison's identity.
_NOT_IDENTITY = {
    "output_dir", "report_to", "run_name", "project", "disable_tqdm", "push_to_hub", "resume_from_checkpoint", "seed",
    "local_rank", "do_train", "do_eval", "do_predict", "debug", "skip_memory_metrics", "per_device_eval_batch_size",
    "batch_eval_metrics", "prediction_loss_only", "include_for_metrics", "restore_callback_states_from_checkpoint",
    "torch_empty_cache_steps", "include_num_input_tokens_seen",
}  # fmt: skip
_NOT_IDENTITY_PREFIXES = ("logging_", "log_", "save_", "hub_", "eval_", "trackio_", "dataloader_")
_IDENTITY_DESPITE_PREFIX = {"dataloader_drop_last", "dataloader_in_order"}


def training_identity(training) -> dict:
    """Every TrainingArguments field that can change a run's result (`_NOT_IDENTITY` aside)."""
    values = training.to_dict()
    return {
        name: value
        for name, value in sorted(values.items())
        if name in _IDENTITY_DESPITE_PREFIX
        or (name not in _NOT_IDENTITY and not name.startswith(_NOT_IDENTITY_PREFIXES))
    }


def data_file_hashes(data) -> dict:
    """A SHA-256 of each data file (and label file) the comparison reads: new content at the same path is another
    experiment."""
    import hashlib

    hashes = {}
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(data, name, None)
        if not path:
            continue
        files = [Path(path)]
        if getattr(data, "label_suffix", None):
            files.append(Path(path).with_suffix(f".{data.label_suffix}"))
        for file in files:
            if file.is_file():
                digest = hashlib.sha256()
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                hashes[file.name if file == files[0] else f"{name} labels {file.name}"] = digest.hexdigest()
    return hashes


def _settings(spec: RunSpec) -> dict:
    """What makes two comparisons the same experiment (seeds and run names may differ): the model, data, run and every
    training argument that can change a result, and the content of each data file."""
    training = spec.training
    return json.loads(
        _to_json(
            dict(
                config=spec.config,
                model=asdict(spec.model),
                data=asdict(spec.data),
                data_sha256=data_file_hashes(spec.data),
                run={k: v for k, v in asdict(spec.run).items() if k != "save"},
                training=dict(
                    training_identity(training),
                    batch_size=training.per_device_train_batch_size,
                    lr_scheduler_type=str(training.lr_scheduler_type),
                ),
            )
        )
    )


def read_state(path: Path, read):
    """`read(path)` for a file the comparison keeps between calls (settings.json, a run's result, the reference LM):
    a truncated or corrupted one is named, with the way out."""
    try:
        return read(path)
    except Exception as error:  # noqa: BLE001 - any failure to read back a saved state is that file's
        raise ValueError(
            f"{path} is truncated or corrupted ({type(error).__name__}: {error}). It is the comparison's saved state: "
            "delete it to recompute it (a run's file: that run trains again)."
        ) from None


def kept_or_made(path: Path, kept_when: Path, make):
    """`make(path)`, which reads a state the comparison kept at `path` (named if damaged, `read_state`) or makes and
    keeps it when `kept_when` does not exist yet."""
    return read_state(path, make) if kept_when.is_file() else make(path)


def run_comparison(argv: list[str]) -> dict:
    """`scalevae compare ARGV`: train and evaluate every run × seed not already in `OUTPUT_DIR/runs/`, then write the
    table, JSON and PNGs over every finished run in the folder (a later call with other `--seeds` or `--runs` adds to
    it). Returns the summary (see `summarize`)."""
    from tqdm.auto import tqdm

    spec, options = comparison_spec(argv)
    output = spec.output_dir
    (output / "runs").mkdir(parents=True, exist_ok=True)
    settings_file = output / "settings.json"
    settings = _settings(spec)
    if settings_file.exists() and read_state(settings_file, lambda p: json.loads(p.read_text())) != settings:
        raise ValueError(
            f"{output} holds a comparison with other settings ({settings_file}); resume it with the same preset and "
            "options, or choose another --output_dir."
        )
    write_atomically(settings_file, json.dumps(settings, indent=2))

    names = run_names(options, bool(spec.data.label_suffix))
    todo = [(name, seed) for seed in options.seeds for name in names]
    data = reference_lm = classifier = None
    progress = tqdm(todo, desc=f"compare {options.preset}", unit="run")
    for name, seed in progress:
        path = output / "runs" / f"{name}-seed{seed}.json"
        if path.exists():
            continue
        progress.set_postfix_str(f"{name} seed {seed}")
        if data is None:
            with quiet():
                data = prepare_data(spec.replace(training=dict(output_dir=str(output / "work"))))
                # One reference language model per comparison scores every run's samples (saved, so a resumed
                # comparison uses the same one).
                claims, control = spec.run.claims, spec.run.control and "train" in data.labels
                reference_lm = classifier = None
                if claims:
                    folder = output / "reference_lm"
                    reference_lm = kept_or_made(
                        folder, folder / "config.json", lambda p: reference_language_model(spec, data, p)
                    )
                if control:
                    file = output / "text_classifier.npz"
                    classifier = kept_or_made(file, file, lambda p: text_classifier(data, p))
        result = train_and_evaluate(name, seed, spec, data, reference_lm, classifier)
        write_atomically(path, _to_json(result, indent=1))  # a killed run leaves no half-written result behind
    # The table covers every finished run in the folder, so seeds added later for a subset of runs join it.
    results = [
        read_state(path, lambda p: json.loads(p.read_text()))
        for path in sorted((output / "runs").glob("*-seed*.json"))
    ]
    results.sort(
        key=lambda r: (
            list(BASELINES).index(r["run"]) if r["run"] in BASELINES else len(BASELINES),
            r["run"],
            r["seed"],
        )
    )
    summary = summarize(results, options.preset, settings)
    write_atomically(output / "results.json", _to_json(summary, indent=2))
    write_atomically(output / "results.md", format_markdown(summary))
    from .plots import plot_comparison, plot_control, plot_control_tradeoff

    plot_comparison(results, summary, output)
    control = {}
    for result in results:
        if "control_acc50" in result.get("test", {}):
            control.setdefault(result["run"], []).append(result["test"])
    for name, runs in control.items():
        plot_control(runs, output / f"control_{name}.png", title=f"{described(summary)}: {name}")
    if control:
        plot_control_tradeoff(control, output / "control_tradeoff.png", title=described(summary))
        write_atomically(output / "control_examples.md", format_control_examples(results))
    return summary


def format_control_examples(results: list[dict]) -> str:
    """The first test sentences of each remedy's first seed and their edits, as the measurement made them, at the
    strength where its transfer first reached 50% (the largest strength when none did)."""
    from .control import format_examples

    lines = ["The first test sentences and their sentiment flipped through the latent, as measured (not chosen)."]
    for result in results:
        test = result["test"]
        if result["seed"] != min(r["seed"] for r in results if r["run"] == result["run"]):
            continue
        examples = test.get("control_examples") or {}
        if not examples:
            continue
        strength = test.get("control_strength50")
        reached = strength is not None and math.isfinite(strength)
        strength = f"{strength:g}" if reached else max(examples, key=float)
        accuracy = test.get(f"control_acc@{float(strength)}")
        lines += [
            "",
            f"**{result['run']}** (seed {result['seed']}), strength {strength}"
            + ("" if reached else " (transfer never reached 50%)")
            + (f", transfer accuracy {accuracy:.2f}" if accuracy is not None else "")
            + ":",
            "",
            "```",
            format_examples(examples[strength]),
            "```",
        ]
    return "\n".join(lines) + "\n"


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


def summarize(results: list[dict], preset: str, settings: dict) -> dict:
    """Per run: mean and sd over seeds of every test (and validation) figure; the best des_std on validation."""
    by_run = {}
    for result in results:
        by_run.setdefault(result["run"], []).append(result)
    table = {}
    for name, runs in by_run.items():
        row = {}
        for split in ("validation", "test"):
            if split not in runs[0]:
                continue
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
    chosen, lowest = choose_des_std(table, sweep)
    data = Path(settings["data"]["train_file"]).name if settings["data"].get("train_file") else "its dataset"
    return dict(preset=preset, data=data, settings=settings, runs=table, chosen_scale=chosen, lowest_nll_scale=lowest)


def described(summary: dict) -> str:
    """What a figure's title says of a comparison: its preset and the training file actually used (`--train_file`
    may replace the preset's)."""
    return f"{summary['preset']} on {summary.get('data', 'its data')}"


def choose_des_std(table: dict, sweep: list[str]) -> tuple[str | None, str | None]:
    """Scale-VAE's des_std, chosen on validation only: `(chosen, lowest)`. `chosen`: the run whose decoder's latent
    carries the most information (MI) among those whose IW-NLL (under the runs' prior, `--prior`) is within 1% of the
    plain VAE's, the comparison the paper's claim is about; None when the rule cannot hold (no VAE run, or no des_std
    within 1%). `lowest`: the lowest validation IW-NLL, whatever its MI (None without a sweep)."""
    nll = {n: table[n]["validation"]["nll"][0] for n in sweep}
    candidates = [n for n in sweep if nll[n] is not None and math.isfinite(nll[n])]  # a diverged run is no candidate
    if not candidates:
        return None, None
    lowest = min(candidates, key=nll.get)
    vae = table.get("vae", {}).get("validation", {}).get("nll", (None,))[0]
    if vae is None or not math.isfinite(vae):
        return None, lowest

    def information(name):
        mi = table[name]["validation"]["mi_decoder"][0]
        return mi if mi is not None and math.isfinite(mi) else -math.inf

    within = [n for n in candidates if nll[n] <= 1.01 * vae]
    return (max(within, key=information) if within else None), lowest


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
    """The comparison tables: one per claim (every column of `CLAIMS` that was measured, or those named in `keys`)."""
    settings = summary["settings"]
    runs = summary["runs"]
    chosen = summary["chosen_scale"]
    rule = (
        f"Scale-VAE's des_std, chosen on validation: `{chosen}` (most MI of the decoder's latent within 1% of the "
        "VAE's IW-NLL)"
        if chosen
        else "Scale-VAE's des_std: no des_std within 1% of the VAE's validation IW-NLL (or no VAE run), none chosen"
    )
    lines = [
        f"Comparison `{summary['preset']}` on `{summary.get('data', 'its data')}`: test split, mean ± sd over the "
        "seeds in the `seeds` column; "
        f"{settings['training']['max_steps']} steps of batch {settings['training']['batch_size']}, "
        f"k = {settings['run']['num_importance_samples']} importance samples. {rule}; lowest validation IW-NLL: "
        f"`{summary.get('lowest_nll_scale')}`.",
    ]
    for claim, claim_keys in CLAIMS.items():
        columns = [
            (key, metric_info(key).name, ".1f" if metric_info(key).format == "d" else metric_info(key).format)
            for key in claim_keys
            if any(key in row["test"] for row in runs.values()) and (not keys or key in keys)
        ]
        if not columns:
            continue
        lines += [
            "",
            f"**{claim[0].upper() + claim[1:]}**",
            "",
            "| run | seeds | " + " | ".join(header for _, header, _ in columns) + " |",
            "|---|---|" + "---:|" * len(columns),
        ]
        for name, row in runs.items():
            cells = []
            for key, _, fmt in columns:
                mean, sd = row["test"].get(key, (float("nan"), float("nan")))
                if mean is None or math.isnan(mean):
                    cells.append("–")
                    continue
                spread = f" ± {sd:{fmt}}" if len(row["seeds"]) > 1 else ""
                cells.append(f"{mean:{fmt}}{spread}")
            marker = " (chosen)" if name == chosen else ""
            seeds = ",".join(str(seed) for seed in row["seeds"])
            lines.append(f"| {name}{marker} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_language_model(spec: RunSpec, data, folder: Path):
    """The comparison's reference LM (a plain GPT-2 of the decoder's size trained on the same training split), trained
    once and kept in `folder`: every run's samples are scored by the same model."""
    from transformers import GPT2LMHeadModel

    from modeling_scalevae import default_decoder_config

    from .claims import train_language_model

    if (folder / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer, model = data.decoder_tokenizer, spec.model
    config = default_decoder_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        n_layer=model.decoder_layers,
        n_embd=model.decoder_width,
        n_head=model.decoder_heads,
    )
    return train_language_model(
        data.dataset["train"],
        data.decoder_tokenizer,
        config,
        max_length=spec.data.max_length,
        max_steps=spec.training.max_steps,
        batch_size=spec.training.per_device_train_batch_size,
        learning_rate=spec.training.learning_rate,
        seed=0,
        output_dir=str(folder),
    )
