"""Fine-tune a saved Scale-VAE on other text with the stock transformers Trainer.

    python examples/finetune_with_trainer.py --model outputs/accelerate/model              # SNLI sentences, 200 steps
    python examples/finetune_with_trainer.py --model runs/ptb/final --train_file my.txt --kl_weight 0.5

The saved folder's config, weights and both tokenizers carry on, and so do the buffers the model keeps beside its
weights: Scale-VAE's running scale factors and schedule counts, and the fitted prior. The default text, SNLI's
sentences, is read at run time from ../shared/data (never copied into this repository). `scalevae train
--model_name_or_path FOLDER` does the same from the command line.
"""

import argparse
from pathlib import Path

from transformers import TrainingArguments

from scalevae import load_pretrained
from scalevae.data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
from scalevae.hub import save_model
from scalevae.training import make_trainer

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "snli.train.txt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a folder saved by scalevae (or a Hub id)")
    parser.add_argument("--train_file", default=str(DEFAULT_TEXT), help="one sentence per line")
    parser.add_argument("--kl_weight", type=float, default=None, help="β for fine-tuning (default: the saved one)")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--learning_rate", type=float, default=1e-4, help="lower than from scratch: keep what it knows"
    )
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/finetune")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.train_file).exists():
        raise SystemExit(f"--train_file {args.train_file} does not exist: give a text file, one sentence per line.")
    # Config fields given to from_pretrained override the saved config; loading stays strict, so one the weights
    # cannot follow (e.g. latent_size) raises a ValueError naming it.
    overrides = {"kl_weight": args.kl_weight} if args.kl_weight is not None else {}
    model, encoder_tokenizer, decoder_tokenizer = load_pretrained(args.model, **overrides)

    texts = load_text_dataset({"train": args.train_file})
    dataset, _ = tokenize_dataset(texts, encoder_tokenizer, decoder_tokenizer, args.max_length)
    collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    # make_trainer adds the collapse strategy's step/epoch hooks (Scale-VAE's factors keep updating from where the
    # saved model left them) and refits the prior on the new text at the end.
    trainer = make_trainer(model, training_args, dataset["train"], collator, processing_class=encoder_tokenizer)
    trainer.train()

    output = Path(args.output_dir) / "model"
    recipe = dict(
        data=args.train_file,
        steps=trainer.state.global_step,
        fine_tuned_from=args.model,
        command="examples/finetune_with_trainer.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    )
    save_model(output, model, encoder_tokenizer, decoder_tokenizer, training=recipe)
    print(f"saved {output}")
    return output


if __name__ == "__main__":
    main()
