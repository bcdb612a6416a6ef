"""Fine-tune a saved Scale-VAE on other text with the stock transformers Trainer.

    python examples/finetune_with_trainer.py --model_name_or_path outputs/accelerate/final   # SNLI, 200 steps
    python examples/finetune_with_trainer.py --model_name_or_path runs/ptb/final --train_file my.txt --kl_weight 0.5

The saved folder's config, weights and both tokenizers carry on, and so do the buffers the model keeps beside its
weights: Scale-VAE's running scale factors and schedule counts, and the fitted prior. The default text, SNLI's
sentences, is read at run time from ../shared/data (never copied into this repository). A preset of the run recipe:
`scalevae train --model_name_or_path FOLDER` does the same with the recipe's defaults.
"""

import sys
from pathlib import Path

from scalevae.recipe import RunSpec, run

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "snli.train.txt"
# The example's preset of the run recipe's options: a lower learning rate than from scratch keeps what it knows.
PRESET = dict(
    train_file=str(DEFAULT_TEXT),
    max_steps=200,
    per_device_train_batch_size=32,
    learning_rate=1e-4,
    max_length=32,
    logging_steps=50,
    seed=0,
    output_dir="outputs/finetune",
    save_strategy="no",
    report_to=[],
)


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    spec, _, _ = RunSpec.parse(argv, PRESET, prog="finetune_with_trainer.py")
    if not spec.model.model_name_or_path:
        raise SystemExit("--model_name_or_path is required: a folder saved by scalevae (or a Hub id).")
    if not Path(spec.data.train_file).exists():
        raise SystemExit(
            f"--train_file {spec.data.train_file} does not exist: give a text file, one sentence per line."
        )
    # The recipe loads the folder strictly with the config fields given (a kl_weight, say) and trains with the stock
    # Trainer (make_trainer: the strategy's step/epoch hooks continue from the saved buffers, and the prior is refitted
    # on the new text at the end).
    result = run(spec, command=" ".join(["examples/finetune_with_trainer.py", *argv]))
    print(f"saved {result.folder}")
    return result.folder


if __name__ == "__main__":
    main()
