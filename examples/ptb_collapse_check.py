"""Does Scale-VAE keep the latent alive where a plain VAE collapses? PTB, same parts, data, steps and seed.

    python examples/ptb_collapse_check.py                   # 1,000 steps each; about 45 minutes on 2 CPU cores
    python examples/ptb_collapse_check.py --max_steps 200   # a quicker look

Setup (the issue's prototype): MiniLM-L6 encoder, 4-layer 256-wide GPT-2 decoder, latent 32, memory + embedding
injection, batch 32, <= 32 tokens, AdamW 5e-4, 7,000 PTB training sentences, des_std 1.0. PTB is read at run time from
../shared/data (research use only; never copied into this repository). Prints the metrics table, the checks below and
the step-time ratio, and writes plots and JSON under --output_dir.
"""

import argparse
import json
import sys
from pathlib import Path

from scalevae.quickstart import run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(DATA))
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--train_sentences", type=int, default=7000)
    parser.add_argument("--eval_sentences", type=int, default=500)
    parser.add_argument("--num_importance_samples", type=int, default=50)
    parser.add_argument("--output_dir", default="outputs/ptb_collapse_check")
    args = parser.parse_args()
    data = Path(args.data_dir)
    files = {
        split: data / f"ptb.{name}.txt"
        for split, name in [("train", "train"), ("validation", "valid"), ("test", "test")]
    }
    if not all(f.exists() for f in files.values()):
        sys.exit(f"PTB files not found under {data} (ptb.train.txt, ptb.valid.txt, ptb.test.txt)")
    results = run(
        args.output_dir,
        "scale",
        compare_vae=True,
        data_files={k: str(v) for k, v in files.items()},
        train_sentences=args.train_sentences,
        max_steps=args.max_steps,
        eval_sentences=args.eval_sentences,
        num_importance_samples=args.num_importance_samples,
        logging_steps=50,
    )
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
    Path(args.output_dir, "checks.json").write_text(json.dumps(checks, indent=2))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
