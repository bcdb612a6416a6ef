"""Consistency of a latent space: how much of the latents a decode-then-encode cycle gives back."""

import datasets
import evaluate

from scalevae.claims import consistency_figures

_DESCRIPTION = """Consistency of the latent space of a text VAE (scalevae's definition; see scalevae.claims): for N
cycles latent z -> greedy text -> the text's latent ẑ, `top1` is the share of cycles whose ẑ is closest (cosine, each set
centred) to its own z among all N (1/N by chance)."""

_INPUTS = """
Args:
    predictions (`list[list[float]]`): the recovered latents ẑ, (N, d).
    references (`list[list[float]]`): the starting latents z, (N, d), row for row.
Returns:
    `{"top1": float}`.
"""


class LatentConsistency(evaluate.Metric):
    def _info(self):
        vector = datasets.Sequence(datasets.Value("float64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": vector, "references": vector}),
        )

    def _compute(self, predictions, references):
        return consistency_figures(references, predictions)
