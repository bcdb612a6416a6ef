"""The `scalevae` command: quickstart, train, evaluate, generate."""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configuration_scalevae import COLLAPSE_STRATEGIES

TRAIN_HELP = """Train with the stock transformers Trainer. Every TrainingArguments option is accepted, plus the model's
and the data's options below. Example:
  scalevae train --output_dir runs/ptb --train_file ../shared/data/ptb.train.txt
      --validation_file ../shared/data/ptb.valid.txt --collapse_strategy scale --des_std 1.0 --max_steps 2000
Fine-tune a saved model on other text (its config, weights and tokenizers; options given override its config):
  scalevae train --model_name_or_path runs/ptb/final --output_dir runs/snli --train_file ../shared/data/snli.train.txt
      --kl_weight 0.5 --max_steps 500"""


@dataclass
class ModelArguments:
    """How the model is built and trained; its hyperparameters are `ScaleVAEConfig`'s (see `config_arguments`)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "fine-tune a saved Scale-VAE (a folder or Hub id written by scalevae.hub.save_model or `scalevae "
            "train`) instead of building a new model: its config, weights, both tokenizers and its scale-factor, "
            "schedule and prior buffers carry on. Config options given override the saved config where the weights "
            "can follow (kl_weight, scale_target_std, scale_momentum, scale_schedule, free_bits, freeze_encoder, ...);"
            " options that change the architecture (latent_size, latent_injection, a collapse_strategy with other "
            "buffers, the encoder/decoder options) are refused."
        },
    )
    encoder: str | None = field(
        default=None, metadata={"help": "BERT-style encoder path or Hub id (default: offline MiniLM)."}
    )
    decoder: str | None = field(default=None, metadata={"help": "GPT-2 path or Hub id (default: a new small GPT-2)."})
    decoder_layers: int = field(default=4, metadata={"help": "size of the new GPT-2 when --decoder is not given"})
    decoder_width: int = 256
    decoder_heads: int = 4
    decoder_vocab_size: int = field(
        default=4096, metadata={"help": "BPE vocabulary fitted to the training text for a new decoder"}
    )
    kl_schedule: str = field(
        default="constant", metadata={"help": "constant | linear | cyclical (β rises to --kl_weight)"}
    )
    kl_warmup_steps: int = 0
    kl_n_cycle: int = 4
    kl_ratio_zero: float = 0.25
    kl_ratio_increase: float = 0.25


# Config fields that are not hyperparameters a user sets on the command line.
_NOT_OPTIONS = ("encoder", "decoder", "scalevae_format_version", "scalevae_version")


def config_arguments(config_class=None) -> type:
    """A dataclass with one field per `ScaleVAEConfig` field: the config's name, type, default and the help text of
    its docstring, and its paper aliases (`--des_std`, `--f_epo`). `HfArgumentParser` turns it into options, so a field
    added to the config reaches `scalevae train` without touching this file."""
    import dataclasses
    import inspect
    import re

    from configuration_scalevae import PAPER_ALIASES, ScaleVAEConfig

    config_class = config_class or ScaleVAEConfig
    # Google style, as transformers: "    name (`type`, ...):" then its text indented further (after cleandoc).
    doc = "\n".join(
        inspect.cleandoc(base.__doc__)
        for base in config_class.__mro__
        if isinstance(base, type) and issubclass(base, ScaleVAEConfig) and base.__doc__
    )
    aliases = {field_name: alias for alias, field_name in PAPER_ALIASES.items()}
    specs = []
    # ScaleVAEConfig's own fields and those of its subclasses, not PreTrainedConfig's (return_dict, dtype, ...).
    own = set().union(
        *(
            vars(base).get("__annotations__", {})
            for base in config_class.__mro__
            if isinstance(base, type) and issubclass(base, ScaleVAEConfig)
        )
    )
    for item in dataclasses.fields(config_class):
        if item.name not in own or item.name in _NOT_OPTIONS:
            continue
        match = re.search(rf"^ {{4}}{item.name} \(.*?\):\n(.*?)(?=^ {{4}}\w+ \(|\Z)", doc, re.S | re.M)
        help_text = " ".join(match.group(1).split()) if match else ""
        metadata = {"help": help_text.replace("%", "%%")}
        if item.name in aliases:
            metadata["aliases"] = [f"--{aliases[item.name]}"]
        kind = item.type
        if kind == (bool | int):  # freeze_encoder: True, False or a number of layers
            kind, default = str, str(item.default)
        else:
            default = item.default
        specs.append((item.name, kind, dataclasses.field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass("ScaleVAEConfigArguments", specs)


def config_kwargs_from(arguments) -> dict:
    """The parsed config options as `ScaleVAEConfig` keyword arguments."""
    import dataclasses

    kwargs = dataclasses.asdict(arguments)
    if isinstance(kwargs.get("freeze_encoder"), str):
        value = kwargs["freeze_encoder"]
        parsed = {"true": True, "false": False, "all": True, "none": False}.get(value.lower())
        if parsed is None and not value.isdigit():
            raise ValueError(f"--freeze_encoder {value!r}: give true, false or a number of lower encoder layers.")
        kwargs["freeze_encoder"] = parsed if parsed is not None else int(value)
    return kwargs


# ModelArguments fields that describe how a new model is built: meaningless when a saved one is fine-tuned.
NEW_MODEL_OPTIONS = ("encoder", "decoder", "decoder_layers", "decoder_width", "decoder_heads", "decoder_vocab_size")


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options `argv` actually gives (also under an alias or a `--no_*` form), as opposed to
    those holding their defaults: a dataclass default must not overwrite a value saved in a folder."""
    defaults = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in defaults:
            action.default = default
        parser._defaults.update(saved_defaults)
    return set(vars(given))


def load_for_finetuning(model_name_or_path: str, overrides: dict):
    """A saved model and its two tokenizers, its config updated by `overrides` (`ScaleVAEConfig` fields the user gave).

    The model loads through `ScaleVAEForLatentLM.from_pretrained` (a folder or a Hub id), strictly: an override the
    saved weights cannot follow (a latent size, an injection or a collapse strategy with other tensors) makes the load
    fail, and the error names the override. The collapse strategy's buffers (Scale-VAE's running scale factors and
    schedule counts, BN-VAE's statistics) and the fitted prior continue from their saved values.

    Raises:
        ValueError: an override is not a valid config value, or the saved weights cannot follow it.
    """
    import re

    from configuration_scalevae import ScaleVAEConfig
    from modeling_scalevae import ScaleVAEForLatentLM

    from .factory import load_tokenizers

    encoder_tokenizer, decoder_tokenizer = load_tokenizers(model_name_or_path)
    saved = ScaleVAEConfig.from_pretrained(model_name_or_path)
    changed = {name: value for name, value in overrides.items() if getattr(saved, name) != value}

    def described(names) -> str:
        return ", ".join(f"--{name} {changed[name]} (saved: {getattr(saved, name)})" for name in names)

    def load(overrides: dict) -> ScaleVAEForLatentLM:
        try:
            config = ScaleVAEConfig.from_dict({**saved.to_dict(), **overrides})
        except ValueError as error:
            raise ValueError(f"--model_name_or_path {model_name_or_path}: {error}") from error
        return ScaleVAEForLatentLM.from_pretrained(model_name_or_path, config=config)

    try:
        model = load(changed)
    except ValueError as error:
        if not changed or str(error).startswith("--model_name_or_path"):
            raise
        # The strict loader's message names the config fields the weights contradict (latent_size=8 in the
        # config, ...). Where it names only tensors, each change is tried alone: this is the error path, and a
        # message that blames a legal option along with the culprit sends the user the wrong way.
        named = [name for name in changed if re.search(rf"(?<![\w.]){name}\b", str(error))]
        if not named and len(changed) > 1:
            named = [name for name in changed if not loads_with(load, {name: changed[name]})]
        named = named or list(changed)
        raise ValueError(
            f"--model_name_or_path {model_name_or_path}: the saved weights cannot follow {described(named)}; "
            f"fine-tuning keeps the saved model's architecture. Drop the option(s), or train a new model.\n{error}"
        ) from error
    collapse = model.collapse
    schedule_changes = {"scale_schedule", "scale_freeze_steps", "scale_freeze_epochs"} & set(changed)
    if schedule_changes and bool(getattr(collapse, "frozen", False)):
        print(
            f"note: the saved Scale-VAE factors are already frozen (after {int(collapse.steps)} optimizer steps, "
            f"{int(collapse.epochs)} epochs): {described(sorted(schedule_changes))} does not unfreeze them.",
            file=sys.stderr,
        )
    return model, encoder_tokenizer, decoder_tokenizer


def loads_with(load, overrides: dict) -> bool:
    """Whether `load(overrides)` succeeds: the strict loader accepts the saved weights under those overrides."""
    try:
        load(overrides)
    except ValueError:
        return False
    return True


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "one text per line (default: embedded corpus)."})
    validation_file: str | None = None
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset instead of files."})
    text_column: str = "text"
    max_length: int = 64


def train(argv: list[str]) -> None:
    from transformers import HfArgumentParser, TrainingArguments, enable_full_determinism, set_seed

    from .card import checkpoint_config_differences, public_command
    from .data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
    from .factory import build_model
    from .hub import save_model
    from .training import KLSchedule, make_trainer

    parser = HfArgumentParser(
        (config_arguments(), ModelArguments, DataArguments, TrainingArguments), description=TRAIN_HELP
    )
    config_args, model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    config_kwargs = config_kwargs_from(config_args)
    given = explicit_options(parser, argv)
    if model_args.model_name_or_path:
        new_model_only = [name for name in NEW_MODEL_OPTIONS if name in given]
        if new_model_only:
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path} fine-tunes a saved model with its own encoder, "
                f"decoder and tokenizers: {', '.join('--' + name for name in new_model_only)} only build(s) a new "
                "model. Drop the option(s)."
            )
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"--max_steps {training_args.max_steps}: give a number of optimizer steps >= 1, or leave it out (-1) to "
            "train for --num_train_epochs."
        )
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        raise ValueError(
            f"--num_train_epochs {training_args.num_train_epochs} must be > 0 (or give --max_steps >= 1)."
        )
    # The model's random initialisation is part of the run: seed before building it (Trainer seeds only itself).
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)
    if data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        raw = load_text_dataset(files)
    else:
        raw = load_text_dataset(dataset_name=data_args.dataset_name, text_column=data_args.text_column)
    if model_args.model_name_or_path:
        model, encoder_tokenizer, decoder_tokenizer = load_for_finetuning(
            model_args.model_name_or_path, {name: value for name, value in config_kwargs.items() if name in given}
        )
    else:
        model, encoder_tokenizer, decoder_tokenizer = build_model(
            model_args.encoder,
            model_args.decoder,
            train_texts=raw["train"]["text"],
            decoder_vocab_size=model_args.decoder_vocab_size,
            decoder_config_overrides=dict(
                n_layer=model_args.decoder_layers, n_embd=model_args.decoder_width, n_head=model_args.decoder_heads
            ),
            **config_kwargs,
        )
    # decoder sequences are at most max_length long, and with memory injection the latent takes one more position
    longest = model.config.decoder.n_positions - int(model.config.latent_injection != "embedding")
    if data_args.max_length > longest:
        raise ValueError(
            f"--max_length {data_args.max_length} does not fit the decoder's {model.config.decoder.n_positions} "
            f"positions (the latent takes one with --latent_injection {model.config.latent_injection}): use "
            f"--max_length <= {longest}."
        )
    if training_args.resume_from_checkpoint:
        differences = checkpoint_config_differences(model.config, training_args.resume_from_checkpoint)
        if differences:
            raise ValueError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint} was trained with another model: "
                + "; ".join(differences)
                + ". Resume with the options the checkpoint was trained with."
            )
    dataset, _ = tokenize_dataset(raw, encoder_tokenizer, decoder_tokenizer, data_args.max_length)
    total = training_args.max_steps if training_args.max_steps > 0 else None
    schedule = KLSchedule(
        model_args.kl_schedule,
        model.config.kl_weight,  # a fine-tuned model's saved β unless --kl_weight is given
        model_args.kl_warmup_steps,
        total or 0,
        model_args.kl_n_cycle,
        model_args.kl_ratio_zero,
        model_args.kl_ratio_increase,
    )
    # The card's record: no credentials, no local paths (render_model_card scrubs them).
    recipe = dict(
        data=data_args.train_file or data_args.dataset_name or "embedded default corpus",
        command=public_command(["scalevae", "train", *argv]),
    )
    if model_args.model_name_or_path:
        recipe["fine_tuned_from"] = model_args.model_name_or_path  # the card shows a local folder by its name only
    trainer = make_trainer(
        model,
        training_args,
        dataset["train"],
        DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer),
        eval_dataset=dataset.get("validation"),
        kl_schedule=schedule,
        processing_class=encoder_tokenizer,
        training=recipe,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    recipe["steps"] = trainer.state.global_step
    save_model(Path(training_args.output_dir) / "final", model, encoder_tokenizer, decoder_tokenizer, training=recipe)
    print(f"saved {Path(training_args.output_dir) / 'final'}")


def evaluate(args) -> None:
    from torch.utils.data import DataLoader

    from .data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
    from .factory import load_pretrained
    from .metrics import evaluate_model, reconstruction_bleu_of

    model, encoder_tokenizer, decoder_tokenizer = load_pretrained(args.model)
    model.to(resolve_device(args.device))
    texts = load_text_dataset({"test": args.data})["test"]
    if args.max_sentences:
        texts = texts.select(range(min(args.max_sentences, len(texts))))
    dataset, _ = tokenize_dataset(texts, encoder_tokenizer, decoder_tokenizer, args.max_length)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, collate_fn=DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    )
    generator = torch.Generator().manual_seed(args.seed)
    metrics = evaluate_model(model, loader, num_importance_samples=args.num_samples, generator=generator)
    metrics["bleu"] = reconstruction_bleu_of(
        model, texts["text"], encoder_tokenizer, decoder_tokenizer, args.max_length
    )
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    output = Path(args.output or Path(args.model) / "eval_results.json")
    # NaN marks a figure not computed (e.g. NLL with --num_samples 0): JSON has no NaN, null says the same.
    output.write_text(json.dumps({k: None if v != v else v for k, v in metrics.items()}, indent=2, allow_nan=False))
    print(f"wrote {output}")


def generate(args) -> None:
    from .latent import LatentText

    text = LatentText.from_pretrained(args.model)
    text.model.to(resolve_device(args.device))
    decoding = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    if args.do_sample:
        decoding.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    generator = torch.Generator(device=text.model.device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if args.sample:
        outputs = text.sample(args.sample, generator=generator, **decoding)
    elif args.reconstruct:
        outputs = text.reconstruct(args.reconstruct, **decoding)
    elif args.interpolate:
        outputs = text.interpolate(*args.interpolate, steps=args.steps, **decoding)
    elif args.analogy:
        outputs = [text.analogy(*args.analogy, **decoding)]
    else:
        raise SystemExit(
            "scalevae generate: give one of --sample N, --reconstruct TEXT, --interpolate A B, --analogy A B C"
        )
    for line in outputs:
        print(line)


def resolve_device(name: str | None) -> torch.device:
    """`--device`: the name given, else CUDA when there is a GPU, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps): {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch build or machine has no CUDA GPU; use --device cpu.")
    return device


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train(argv[1:])
    parser = argparse.ArgumentParser(prog="scalevae", description="Scale-VAE text VAEs on Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="train on the embedded corpus and show what the model learned")
    quick.add_argument("--output_dir", default="outputs/quickstart")
    quick.add_argument("--collapse_strategy", default="scale", choices=COLLAPSE_STRATEGIES)
    quick.add_argument("--compare_vae", action="store_true", help="also train a plain VAE and print it beside")
    quick.add_argument("--train_minutes", type=float, default=7.0, help="wall-clock training budget of each run")
    quick.add_argument(
        "--max_steps", type=int, default=None, help="train exactly this many steps instead (reproducible)"
    )
    quick.add_argument("--batch_size", type=int, default=32)
    quick.add_argument("--learning_rate", type=float, default=5e-4, help="constant after 50 warm-up steps")
    quick.add_argument("--des_std", type=float, default=1.0, help="Scale-VAE's target std of the scaled means")
    quick.add_argument(
        "--freeze_encoder",
        default="all",
        help="'all' (default: only the latent head and decoder train), 'none', or a number of lower layers",
    )
    quick.add_argument(
        "--decoder_vocab_size", type=int, default=4096, help="size of the BPE fitted to the training text"
    )
    quick.add_argument("--num_importance_samples", type=int, default=10)
    quick.add_argument("--eval_sentences", type=int, default=200)
    quick.add_argument("--seed", type=int, default=0)

    commands.add_parser("train", help=TRAIN_HELP.splitlines()[0] + " (see `scalevae train --help`)")

    ev = commands.add_parser("evaluate", help="IW-NLL, PPL, KL, MI, AU, BLEU of a saved model on a text file")
    ev.add_argument("model")
    ev.add_argument("--data", required=True, help="one sentence per line")
    ev.add_argument("--num_samples", type=int, default=500, help="importance samples per sentence")
    ev.add_argument("--max_sentences", type=int, default=None)
    ev.add_argument("--max_length", type=int, default=64)
    ev.add_argument("--batch_size", type=int, default=16)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    ev.add_argument("--output", default=None, help="JSON file (default: MODEL/eval_results.json)")

    gen = commands.add_parser("generate", help="sample, reconstruct, interpolate or do latent arithmetic")
    gen.add_argument("model")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--sample", type=int, metavar="N")
    what.add_argument("--reconstruct", nargs="+", metavar="TEXT")
    what.add_argument("--interpolate", nargs=2, metavar=("A", "B"))
    what.add_argument("--analogy", nargs=3, metavar=("A", "B", "C"), help="decode z_C + z_B - z_A")
    gen.add_argument("--steps", type=int, default=5)
    gen.add_argument("--max_new_tokens", type=int, default=40)
    gen.add_argument("--num_beams", type=int, default=1)
    gen.add_argument("--do_sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top_p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")

    cmp = commands.add_parser(
        "compare",
        help="train every collapse remedy with the same model, data and seeds; write a table, JSON and PNGs",
        description="Trains VAE, VAE + cyclical KL annealing, free bits, BN-VAE, AE and Scale-VAE (running and f_epo "
        "schedules, and a des_std sweep) with the same encoder, decoder, data, steps, optimizer and seeds, evaluates "
        "each under both priors, and writes OUTPUT/results.md, results.json and PNGs. Rerun the same command to resume.",
    )
    from .compare import PRESETS

    cmp.add_argument("--preset", default="ptb-cpu", choices=sorted(PRESETS))
    cmp.add_argument("--output_dir", default=None, help="default: outputs/compare-PRESET")
    cmp.add_argument("--data_dir", default=None, help="folder of the preset's files (default: ../shared/data)")
    cmp.add_argument("--encoder", default=None, help="BERT-style encoder path or Hub id (default: offline MiniLM)")
    cmp.add_argument("--runs", nargs="+", default=None, help="a subset of the runs, e.g. vae bn scale_0.5")
    cmp.add_argument("--seeds", nargs="+", type=int, default=None)
    cmp.add_argument("--max_steps", type=int, default=None, help="override the preset's steps")

    args = parser.parse_args(argv)
    if args.command == "compare":
        from .compare import run_comparison

        output_dir = args.output_dir or f"outputs/compare-{args.preset}"
        run_comparison(args.preset, output_dir, args.data_dir, args.encoder, args.runs, args.seeds, args.max_steps)
        print((Path(output_dir) / "results.md").read_text())
        return
    if args.command == "quickstart":
        from .quickstart import run

        frozen = {"all": True, "none": False}.get(args.freeze_encoder)
        if frozen is None:
            if not args.freeze_encoder.isdigit():
                parser.error(f"--freeze_encoder {args.freeze_encoder!r}: give all, none or a number of layers")
            frozen = int(args.freeze_encoder)
        run(
            output_dir=args.output_dir,
            collapse_strategy=args.collapse_strategy,
            compare_vae=args.compare_vae,
            train_minutes=args.train_minutes,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            des_std=args.des_std,
            freeze_encoder=frozen,
            decoder_vocab_size=args.decoder_vocab_size,
            num_importance_samples=args.num_importance_samples,
            eval_sentences=args.eval_sentences,
            seed=args.seed,
        )
    elif args.command == "evaluate":
        evaluate(args)
    else:
        generate(args)


if __name__ == "__main__":
    main()
