"""The `scalevae` command: quickstart, train, evaluate, generate, edit, compare, demo."""

import argparse
import json
import os
import sys
from dataclasses import MISSING, dataclass, field

import torch

from checks_scalevae import MAX_BEAMS, MAX_GENERATION_ROWS

from .options import (
    OptionParser,
    device_option,
    explicit_options,
    field_specs,
    max_length_option,
    max_new_tokens_option,
    number,
    seed_option,
    validate_options,
)
from .recipe import RunSpec, run

TRAIN_HELP = """Train with the stock transformers Trainer. Every TrainingArguments option is accepted, plus the model's
and the data's options below. Example:
  scalevae train --output_dir runs/ptb --train_file ../shared/data/ptb.train.txt
      --validation_file ../shared/data/ptb.valid.txt --collapse_strategy scale --des_std 1.0 --max_steps 2000
Fine-tune a saved model on other text (its config, weights and tokenizers; options given override its config):
  scalevae train --model_name_or_path runs/ptb/final --output_dir runs/snli --train_file ../shared/data/snli.train.txt
      --kl_weight 0.5 --max_steps 500"""


def train(argv: list[str]) -> None:
    """`scalevae train`: the run recipe with the recipe's own defaults; saves OUTPUT_DIR/final."""
    from .card import public_command
    from .options import OptionError

    spec, _, _ = RunSpec.parse(argv, dict(eval_splits=[]), prog="scalevae train", description=TRAIN_HELP)
    for flag, asked in (("--claims", spec.run.claims), ("--control", spec.run.control)):
        if asked and "test" not in spec.run.eval_splits:  # train evaluates no split unless told
            raise OptionError(
                f"train: {flag} measures on the test split: give --test_file and --eval_splits test (train evaluates "
                "no split by default)."
            )
    result = run(spec, command=public_command(["scalevae", "train", *argv]))
    for split, metrics in result.metrics.items():
        print(f"{split}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"saved {result.folder}")


def evaluate(args) -> None:
    """`scalevae evaluate`: the run recipe's evaluation of one split (`scalevae.evaluation.split_figures`) on a text
    file, under the model's own prior."""
    from .data import load_text_dataset, text_data
    from .evaluation import split_figures
    from .factory import load_pretrained
    from .options import check_max_length, check_output_file
    from .outputs import write_atomically

    if args.output is not None:  # before an evaluation that may take an hour
        check_output_file(args.output, args.model, args.data)
    model, encoder_tokenizer, decoder_tokenizer = load_pretrained(args.model)
    check_max_length(args.max_length, model.config)
    model.to(device_or_exit(args.device))
    raw = load_text_dataset({"test": args.data})
    if args.max_sentences is not None:
        raw["test"] = raw["test"].select(range(min(args.max_sentences, len(raw["test"]))))
    data = text_data(raw, encoder_tokenizer, decoder_tokenizer, args.max_length)
    metrics = split_figures(
        model,
        data,
        "test",
        num_importance_samples=args.num_importance_samples,
        seed=args.seed,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    if args.output is not None:
        # NaN marks a figure not computed (e.g. NLL with --num_importance_samples 0): JSON has no NaN, null says the same.
        figures = {k: None if v != v else v for k, v in metrics.items()}
        print(f"wrote {write_atomically(args.output, json.dumps(figures, indent=2, allow_nan=False))}")


def generate(args) -> None:
    from .latent import LatentText

    if args.label is not None:
        if not args.sample:
            raise SystemExit("scalevae generate: --label goes with --sample N (label-conditional samples).")
        from .control import generate_label

        generate_label(
            args.model, args.sample, args.label, args.labelled_file, args.label_file, args.save_classes,
            seed=args.seed, device=args.device, max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
        return

    text = LatentText.from_pretrained(args.model)
    text.model.to(device_or_exit(args.device))
    decoding = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    if args.do_sample:
        decoding.update(do_sample=True, temperature=args.temperature or 1.0, top_p=args.top_p or 1.0)
    generator = torch.Generator(device=text.model.device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if args.sample:
        outputs = text.sample(args.sample, generator=generator, **decoding)
    elif args.reconstruct:
        outputs = text.reconstruct(args.reconstruct, **decoding)
    elif args.interpolate:
        outputs = text.interpolate(*args.interpolate, steps=args.steps or 5, **decoding)
    elif args.analogy:
        outputs = [text.analogy(*args.analogy, **decoding)]
    else:
        raise SystemExit(
            "scalevae generate: give one of --sample N, --reconstruct TEXT, --interpolate A B, --analogy A B C"
        )
    for line in outputs:
        print(line)


def device_or_exit(name: str | None) -> torch.device:
    """`--device` resolved (`scalevae.factory.resolve_device`); a bad one ends the command with the reason."""
    from .factory import resolve_device

    try:
        return resolve_device(name)
    except ValueError as error:
        raise SystemExit(str(error)) from None


class RenamedOption(argparse.Action):
    """An option that has another name now: given, it ends the command with a usage error naming the new one."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new_name} (one name for importance samples in every command).")


# The options of the commands over a saved model, each declared once on its field (range, default, help):
# `OptionParser` reads them for argparse and `validate_options` for the ranges.
@dataclass
class EvaluateArguments:
    data: str = field(metadata={"help": "one sentence per line"})
    num_importance_samples: int = number(
        500, low=0, integer=True, help="k of the importance-weighted NLL, per sentence (0: no NLL, reported as null)"
    )
    max_sentences: int | None = number(None, low=1, integer=True, help="the first N sentences only (default: all)")
    max_length: int = max_length_option()
    batch_size: int = number(16, low=1, integer=True)
    seed: int = seed_option()
    device: str | None = device_option()
    output: str | None = field(
        default=None,
        metadata={"help": "JSON file for the figures (default: printed only; never inside a model folder)"},
    )


# What `scalevae generate` does (exactly one), and how many texts each takes (None: a number, or any count of texts).
GENERATE_MODES = {"sample": None, "reconstruct": None, "interpolate": 2, "analogy": 3}


@dataclass
class GenerateArguments:
    sample: int | None = number(
        None, low=1, high=MAX_GENERATION_ROWS, integer=True, help="decode N latents drawn from the prior",
        metadata={"metavar": "N"},
    )  # fmt: skip
    reconstruct: list[str] | None = field(default=None, metadata={"help": "texts to reconstruct", "metavar": "TEXT"})
    interpolate: list[str] | None = field(
        default=None, metadata={"help": "two texts A B: decode points on the path between their latents"}
    )
    analogy: list[str] | None = field(default=None, metadata={"help": "three texts A B C: decode z_C + z_B - z_A"})
    steps: int | None = number(
        None, low=2, high=MAX_GENERATION_ROWS, integer=True, only_with="interpolate", help="points on the path (5)"
    )
    max_new_tokens: int = max_new_tokens_option(40)
    num_beams: int = number(1, low=1, high=MAX_BEAMS, integer=True)
    do_sample: bool = field(default=False, metadata={"help": "sample the tokens instead of greedy or beam search"})
    temperature: float | None = number(None, low=0, low_open=True, only_with="do_sample", help="default 1")
    top_p: float | None = number(None, low=0, high=1, low_open=True, only_with="do_sample", help="nucleus mass (1)")
    seed: int = seed_option()
    device: str | None = device_option()
    label: str | None = field(
        default=None, metadata={"help": "with --sample: latents of this class's Gaussian (label-conditional)"}
    )
    labelled_file: str | None = field(
        default=None, metadata={"help": "with --label: texts to fit the classes on, one per line"}
    )
    label_file: str | None = field(
        default=None, metadata={"help": "with --label: one class per line of --labelled_file"}
    )
    save_classes: bool = field(default=False, metadata={"help": "write the fitted classes into the model folder"})


@dataclass
class EditArguments:
    labelled_file: str = field(metadata={"help": "texts the direction is fitted on, one per line"})
    label_file: str = field(metadata={"help": "one class per line of --labelled_file"})
    to: str = field(metadata={"help": "the class to move towards"})
    strength: float = number(
        MISSING, help="in units of the gap between the class means (1: that gap; negative: away from --to)"
    )
    input: str | None = field(
        default=None, metadata={"help": "texts to edit, one per line (default: labelled texts not of --to)"}
    )
    from_label: str | None = field(
        default=None, metadata={"help": "the class to move from (default: the other class)"}
    )
    method: str = field(
        default="mean", metadata={"help": "how the direction is fitted", "choices": ("mean", "logistic")}
    )
    num_examples: int = number(
        10, low=1, high=MAX_GENERATION_ROWS, integer=True, help="without --input: how many labelled texts"
    )
    max_new_tokens: int | None = max_new_tokens_option(None)
    device: str | None = device_option()


COMMANDS = ("quickstart", "train", "evaluate", "generate", "edit", "compare", "demo")
MODEL_COMMANDS = {
    "evaluate": (EvaluateArguments, "IW-NLL, PPL, KL, MI, AU, BLEU of a saved model on a text file"),
    "generate": (GenerateArguments, "sample, reconstruct, interpolate or do latent arithmetic"),
    "edit": (EditArguments, "move sentences along an attribute direction fitted on labelled texts"),
}


def parse_model_command(command: str, argv: list[str]) -> argparse.Namespace:
    """A command over a saved model: `scalevae COMMAND MODEL [options]`, its options parsed and checked against the
    ranges declared on its dataclass's fields."""
    arguments, description = MODEL_COMMANDS[command]
    parser = OptionParser(arguments, prog=f"scalevae {command}", description=description)
    parser.add_argument("model", help="a folder saved by scalevae, or a Hub id")
    if command == "evaluate":
        parser.add_argument("--num_samples", action=RenamedOption, new_name="--num_importance_samples")
    args = parser.parse_args(argv)
    if command == "generate":
        modes = [mode for mode in GENERATE_MODES if getattr(args, mode) is not None]
        if not modes:
            parser.error(f"one of the arguments {' '.join('--' + mode for mode in GENERATE_MODES)} is required")
        if len(modes) > 1:
            parser.error(f"argument --{modes[1]}: not allowed with argument --{modes[0]}")
        expected = GENERATE_MODES[modes[0]]
        if expected and len(getattr(args, modes[0])) != expected:
            parser.error(f"argument --{modes[0]}: expected {expected} arguments")
    validate_options(args, explicit_options(parser, argv), command, specs=field_specs(arguments))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # The run commands parse the run recipe's options (config, model, data, run, TrainingArguments) themselves.
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["quickstart"]:
        from .quickstart import main as quickstart

        quickstart(argv[1:])
        return
    if argv[:1] == ["demo"]:
        from .demo import main as demo

        demo(argv[1:])
        return
    if argv[:1] == ["compare"]:
        from .compare import format_markdown, run_comparison

        print(format_markdown(run_comparison(argv[1:])))
        return
    if argv[:1] == ["evaluate"]:
        return evaluate(parse_model_command("evaluate", argv[1:]))
    if argv[:1] == ["generate"]:
        return generate(parse_model_command("generate", argv[1:]))
    if argv[:1] == ["edit"]:
        from .control import edit_command

        args = parse_model_command("edit", argv[1:])
        edit_command(
            args.model, args.labelled_file, args.label_file, args.to, args.strength, args.input, args.from_label,
            args.method, args.num_examples, args.device, args.max_new_tokens,
        )  # fmt: skip
        return
    # No command, an unknown one or --help: the list of commands.
    parser = argparse.ArgumentParser(prog="scalevae", description="Scale-VAE text VAEs on Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("quickstart", help="train on the embedded corpus and show what the model learned (--help)")
    commands.add_parser("train", help=TRAIN_HELP.splitlines()[0] + " (see `scalevae train --help`)")
    for command, (_, description) in MODEL_COMMANDS.items():
        commands.add_parser(command, help=f"{description} (--help)")
    commands.add_parser(
        "compare",
        help="train every collapse remedy with the same model, data and seeds; write a table, JSON and PNGs (--help)",
    )
    commands.add_parser("demo", help="a local Gradio page over a saved model's latent space (--help; needs [demo])")
    parser.parse_args(argv)


def console() -> None:
    """The `scalevae` program: `main`, with a user's mistake (an option out of range, a missing file or folder, a folder
    in use, a full disk) printed as one line that names it and exit status 2 (a usage error) or 1, not a traceback;
    `SCALEVAE_TRACEBACK=1` shows the traceback."""
    from .hub import FolderInUseError
    from .options import OptionError

    try:
        main()
    except (ValueError, OSError, FolderInUseError) as error:
        if os.environ.get("SCALEVAE_TRACEBACK"):
            raise
        command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else ""
        message = str(error).removeprefix(f"{command}: ") if command else str(error)
        print(f"scalevae{' ' + command if command else ''}: error: {message}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, OptionError) else 1) from None


if __name__ == "__main__":
    console()
