"""The `scalevae` command: quickstart, train, evaluate, generate, edit, compare, demo."""

import argparse
import json
import sys

import torch

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
    parser = argparse.ArgumentParser(prog="scalevae", description="Scale-VAE text VAEs on Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("quickstart", help="train on the embedded corpus and show what the model learned (--help)")
    commands.add_parser("train", help=TRAIN_HELP.splitlines()[0] + " (see `scalevae train --help`)")

    ev = commands.add_parser("evaluate", help="IW-NLL, PPL, KL, MI, AU, BLEU of a saved model on a text file")
    ev.add_argument("model")
    ev.add_argument("--data", required=True, help="one sentence per line")
    ev.add_argument(
        "--num_importance_samples", type=int, default=500, help="k of the importance-weighted NLL, per sentence"
    )
    ev.add_argument("--num_samples", action=RenamedOption, new_name="--num_importance_samples")
    ev.add_argument("--max_sentences", type=int, default=None)
    ev.add_argument("--max_length", type=int, default=64)
    ev.add_argument("--batch_size", type=int, default=16)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    ev.add_argument(
        "--output", default=None, help="JSON file for the figures (default: printed only; never inside a model folder)"
    )

    gen = commands.add_parser("generate", help="sample, reconstruct, interpolate or do latent arithmetic")
    gen.add_argument("model")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--sample", type=int, metavar="N")
    what.add_argument("--reconstruct", nargs="+", metavar="TEXT")
    what.add_argument("--interpolate", nargs=2, metavar=("A", "B"))
    what.add_argument("--analogy", nargs=3, metavar=("A", "B", "C"), help="decode z_C + z_B - z_A")
    gen.add_argument("--steps", type=int, default=None, help="with --interpolate: points on the path (default 5)")
    gen.add_argument("--max_new_tokens", type=int, default=40)
    gen.add_argument("--num_beams", type=int, default=1)
    gen.add_argument("--do_sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=None, help="with --do_sample (default 1)")
    gen.add_argument("--top_p", type=float, default=None, help="with --do_sample: nucleus sampling (default 1)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    gen.add_argument(
        "--label", default=None, help="with --sample: latents of this class's Gaussian (label-conditional)"
    )
    gen.add_argument("--labelled_file", default=None, help="with --label: texts to fit the classes on, one per line")
    gen.add_argument("--label_file", default=None, help="with --label: one class per line of --labelled_file")
    gen.add_argument("--save_classes", action="store_true", help="write the fitted classes into the model folder")

    edit = commands.add_parser("edit", help="move sentences along an attribute direction fitted on labelled texts")
    edit.add_argument("model")
    edit.add_argument("--labelled_file", required=True, help="texts the direction is fitted on, one per line")
    edit.add_argument("--label_file", required=True, help="one class per line of --labelled_file")
    edit.add_argument("--to", required=True, help="the class to move towards")
    edit.add_argument("--strength", required=True, help="in units of the gap between the class means (1: that gap)")
    edit.add_argument(
        "--input", default=None, help="texts to edit, one per line (default: labelled texts not of --to)"
    )
    edit.add_argument("--from_label", default=None, help="the class to move from (default: the other class)")
    edit.add_argument("--method", default="mean", choices=("mean", "logistic"), help="how the direction is fitted")
    edit.add_argument("--num_examples", type=int, default=10, help="without --input: how many labelled texts")
    edit.add_argument("--max_new_tokens", type=int, default=None)
    edit.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")

    commands.add_parser(
        "compare",
        help="train every collapse remedy with the same model, data and seeds; write a table, JSON and PNGs (--help)",
    )

    commands.add_parser("demo", help="a local Gradio page over a saved model's latent space (--help; needs [demo])")

    args = parser.parse_args(argv)
    from .options import COMMAND_OPTIONS, validate_options

    # Every numeric option given is checked against its range; one that does nothing in the chosen mode warns once.
    given = {name for name, value in vars(args).items() if value is not None and value is not False}
    if args.command in COMMAND_OPTIONS:
        validate_options(args, given, args.command, specs=COMMAND_OPTIONS[args.command])
    if args.command == "evaluate":
        evaluate(args)
    elif args.command == "generate":
        generate(args)
    elif args.command == "edit":
        from .control import edit_command

        edit_command(
            args.model, args.labelled_file, args.label_file, args.to, args.strength, args.input, args.from_label,
            args.method, args.num_examples, args.device, args.max_new_tokens,
        )  # fmt: skip


if __name__ == "__main__":
    main()
