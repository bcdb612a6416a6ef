"""The few-label probe of a latent space: logistic regression on N labelled examples, scored on a test set."""

import datasets
import evaluate

from scalevae.claims import PROBE_SIZES, few_label_probe

_DESCRIPTION = """The field's few-label probe of sentence representations (Li et al. 2019; DU-VAE): for each N, a
logistic regression (scikit-learn, L2, C = 1, features standardised) is trained on `repeats` random class-balanced
subsets of N labelled training examples and scored on every test example; the figure is the mean and the standard
deviation of the test accuracies. The inputs are the test examples; the labelled training pool is a keyword argument."""

_INPUTS = """
Args:
    latents (`list[list[float]]`): the test examples' features (e.g. posterior means), (M, d).
    labels (`list[str]`): their classes.
    train_latents (`list[list[float]]`): the labelled training pool's features, (P, d).
    train_labels (`list[str]`): their classes.
    sizes (`list[int]`, defaults to `[100, 1000, 10000]`), repeats (`int`, defaults to 5), seed (`int`, defaults to 0).
Returns:
    `{"accuracy_100": mean, "accuracy_100_sd": sd, ...}`; NaN where a class has fewer than N / classes examples.
"""


class FewLabelProbe(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"latents": datasets.Sequence(datasets.Value("float64")), "labels": datasets.Value("string")}
            ),
        )

    def _compute(self, latents, labels, train_latents, train_labels, sizes=PROBE_SIZES, repeats=5, seed=0):
        results = few_label_probe(train_latents, train_labels, latents, labels, sizes, repeats, seed)
        figures = {}
        for size, (mean, sd) in results.items():
            figures[f"accuracy_{size}"], figures[f"accuracy_{size}_sd"] = mean, sd
        return figures
