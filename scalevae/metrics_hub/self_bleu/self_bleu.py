"""Self-BLEU of generated texts: the mean BLEU of each text against all the others (Zhu et al. 2018)."""

import datasets
import evaluate

from scalevae.claims import self_bleu

_DESCRIPTION = """Self-BLEU (Texygen, Zhu et al. 2018): the mean over predictions of sacreBLEU's sentence BLEU-4
(smoothing "exp", effective order) of each prediction against all the other predictions as references; 0-100, lower
is more diverse. Computed exactly, in one pass over the set."""

_INPUTS = """
Args:
    predictions (`list[str]`): at least two generated texts.
Returns:
    `{"self_bleu": float}`, 0-100.
"""

_CITATION = """@inproceedings{zhu2018texygen, title={Texygen: A Benchmarking Platform for Text Generation Models},
author={Zhu, Yaoming and Lu, Sidi and Zheng, Lei and Guo, Jiaxian and Zhang, Weinan and Wang, Jun and Yu, Yong},
booktitle={SIGIR}, year={2018}}"""


class SelfBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions):
        return {"self_bleu": self_bleu(predictions)}
