"""Distinct-n of generated texts: distinct n-grams / all n-grams over the whole set (Li et al. 2016)."""

import datasets
import evaluate

from scalevae.claims import distinct_n

_DESCRIPTION = """Distinct-n (Li et al. 2016): the number of distinct n-grams divided by the number of n-grams over all
predictions together, on sacreBLEU's 13a tokens; higher is more diverse."""

_INPUTS = """
Args:
    predictions (`list[str]`): generated texts, e.g. decodings of prior samples.
    orders (`list[int]`, defaults to `[1, 2]`): the n of each figure.
Returns:
    `{"distinct_1": float, "distinct_2": float, ...}` in [0, 1].
"""

_CITATION = """@inproceedings{li-etal-2016-diversity, title={A Diversity-Promoting Objective Function for Neural
Conversation Models}, author={Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill},
booktitle={NAACL}, year={2016}}"""


class DistinctN(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, orders=(1, 2)):
        return {f"distinct_{n}": distinct_n(predictions, n) for n in orders}
