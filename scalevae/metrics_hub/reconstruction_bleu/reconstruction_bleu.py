"""Reconstruction BLEU of a text VAE: corpus BLEU (sacreBLEU, 0-100) of each sentence's reconstruction against it."""

import datasets
import evaluate

from scalevae.metrics import reconstruction_bleu

_DESCRIPTION = """Corpus BLEU (sacreBLEU's defaults: 13a tokenisation, 4-grams, brevity penalty; 0-100) of each
prediction (the text decoded from a sentence's latent) against one reference (the sentence). A local module of the
scalevae package: it runs offline, unlike `evaluate.load("bleu")`, which fetches its script from the Hub."""

_INPUTS = """
Args:
    predictions (`list[str]`): the reconstructions, e.g. `LatentText(...).reconstruct(sentences)`.
    references (`list[str]`): one reference sentence per prediction.
Returns:
    `{"bleu": float}`, 0-100.
"""

_CITATION = """@inproceedings{post-2018-call, title={A Call for Clarity in Reporting {BLEU} Scores}, author={Post, Matt},
booktitle={Proceedings of the Third Conference on Machine Translation}, year={2018}}"""


class ReconstructionBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return {"bleu": reconstruction_bleu(references, predictions)}
