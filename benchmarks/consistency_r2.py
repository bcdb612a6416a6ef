"""Which consistency figure misleads: the data cycle of saved models, dimension by dimension (issue 27).

    python benchmarks/consistency_r2.py FOLDER [FOLDER ...] --test_file ../shared/data/yelp_sentiment.test.txt

For each saved model: z = the decoder's posterior mean of the first N test sentences, x̂ = its greedy decoding,
ẑ = the latent of x̂ (`scalevae.claims.data_cycle`). Printed: top-1 retrieval; the R² averaged over dimensions (each
dimension weighted alike, whatever its variance); the pooled R² (the share of z's total variance explained, each
dimension weighted by its variance); the spread of the dimensions' variances; the share of the total variance held by
the 1% of sentences farthest from the mean (how much a few outliers weigh in a least-squares R²); the effective number
of directions z varies along (participation ratio of its covariance's eigenvalues) and the share of its variance in the
top two; and how many of the N reconstructions are distinct texts.
"""

import argparse
import sys

import numpy as np

from scalevae.claims import consistency_figures, data_cycle, latent_codec
from scalevae.latent import LatentText


def per_dimension_r2(z: np.ndarray, z_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R² of each dimension, residual sums, total sums) of the two-fold least-squares map ẑ -> z, as
    `consistency_figures` fits it."""
    half = len(z) // 2
    residual, total = np.zeros(z.shape[1]), np.zeros(z.shape[1])
    for fit, held_out in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        design = np.column_stack([z_hat[fit], np.ones(len(z_hat[fit]))])
        weights = np.linalg.lstsq(design, z[fit], rcond=None)[0]
        predicted = np.column_stack([z_hat[held_out], np.ones(len(z_hat[held_out]))]) @ weights
        residual += ((z[held_out] - predicted) ** 2).sum(0)
        total += ((z[held_out] - z[held_out].mean(0)) ** 2).sum(0)
    return np.maximum(1 - residual / np.maximum(total, 1e-300), 0), residual, total


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--test_file", required=True)
    parser.add_argument("--num_sentences", type=int, default=1000)
    parser.add_argument("--max_length", type=int, default=32)
    args = parser.parse_args(argv)
    with open(args.test_file, encoding="utf-8") as file:
        texts = [line.strip() for line in file if line.strip()][: args.num_sentences]
    print(
        "| model | top-1 | R², mean over dims | R², pooled | dim. variance min / median / max | top 1% of sentences' "
        "share of variance | effective dims | variance in top 2 directions | distinct reconstructions |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for folder in args.folders:
        text = LatentText.from_pretrained(folder)
        encode, decode = latent_codec(
            text.model.eval(), text.encoder_tokenizer, text.decoder_tokenizer, args.max_length
        )
        z, reconstructions, z_hat = data_cycle(texts, encode, decode)
        z, z_hat = z.double().numpy(), z_hat.double().numpy()
        figures = consistency_figures(z, z_hat)
        r2, residual, total = per_dimension_r2(z, z_hat)
        variance = z.var(0)
        distance = ((z - z.mean(0)) ** 2).sum(1)
        top = np.sort(distance)[::-1][: max(1, len(z) // 100)].sum() / distance.sum()
        eigenvalues = np.linalg.eigvalsh(np.cov(z.T))[::-1]
        effective = eigenvalues.sum() ** 2 / (eigenvalues**2).sum()
        print(
            f"| {folder} | {figures['top1']:.3f} | {r2.mean():.3f} | {1 - residual.sum() / total.sum():.3f} | "
            f"{variance.min():.3g} / {np.median(variance):.3g} / {variance.max():.3g} | {top:.3f} | {effective:.1f} | "
            f"{eigenvalues[:2].sum() / eigenvalues.sum():.0%} | {len(set(reconstructions))} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
