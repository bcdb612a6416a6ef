"""Does Scale-VAE keep the latent alive where a plain VAE collapses? PTB, same parts, data, steps and seed.

    python examples/ptb_collapse_check.py                   # 1,000 steps each; about 45 minutes on 2 CPU cores
    python examples/ptb_collapse_check.py --max_steps 200   # a quicker look

A preset of `scalevae quickstart` (the run recipe). Setup: MiniLM-L6 encoder (frozen), 4-layer 256-wide GPT-2 decoder,
latent 32, the latent as a key/value memory slot (the default), batch 32, <= 32 tokens, AdamW 5e-4, 7,000 PTB training
sentences, des_std 1.0 (the quickstart's own is 2.0). PTB is read at run time from ../shared/data (research use only;
never copied into this repository). Prints the metrics table, the checks below and the step-time ratio, and writes
plots and JSON under --output_dir.
"""

import json
import sys
from pathlib import Path

from scalevae.quickstart import main as quickstart

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The check's preset of the quickstart's options; options given on the command line override it.
PRESET = dict(
    train_sentences=7000, max_steps=1000, eval_sentences=500, num_importance_samples=50, logging_steps=50,
    scale_target_std=1.0, output_dir="outputs/ptb_collapse_check",
)  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):  # the options are the quickstart's; help needs no data
        quickstart(["--help"])
    files = {f"--{split}_file": DATA / f"ptb.{name}.txt" for split, name in
             (("train", "train"), ("validation", "valid"), ("test", "test"))}  # fmt: skip
    if not all(path.exists() for path in files.values()):
        sys.exit(f"PTB files not found under {DATA} (ptb.train.txt, ptb.valid.txt, ptb.test.txt)")
    preset = [item for key, value in PRESET.items() for item in (f"--{key}", str(value))]
    preset += [item for option, path in files.items() for item in (option, str(path))]
    results = quickstart([*preset, "--compare_vae", *argv])
    scale = {**results["scale"]["metrics"], **results["scale"]["timing"]}
    vae = {**results["vae"]["metrics"], **results["vae"]["timing"]}
    checks = {
        "more active units on the decoder's latent": scale["au_decoder"] > vae["au_decoder"],
        "better reconstruction (token accuracy from the mean)": scale["token_accuracy"] > vae["token_accuracy"],
        "the decoder depends on z (shuffle gap larger)": scale["shuffle_gap"] > vae["shuffle_gap"],
        "step time within 5% of the VAE's": scale["seconds_per_step"] <= 1.05 * vae["seconds_per_step"],
    }
    print(f"\nstep time Scale-VAE / VAE: {scale['seconds_per_step'] / vae['seconds_per_step']:.3f}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    output = Path(dict(zip(argv[::2], argv[1::2])).get("--output_dir", PRESET["output_dir"]))
    (output / "checks.json").write_text(json.dumps(checks, indent=2))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
