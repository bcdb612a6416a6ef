"""One table of metric names (`scalevae.metrics.METRICS`): every figure the toolkit computes or shows is in it, and the
console, the model card, the comparison table and the plots all read their names from it."""

import torch

from scalevae import card, compare, plots, quickstart
from scalevae.metrics import METRICS, evaluate_model, metric_info
from scalevae.training import latent_statistics
from tests.conftest import random_batch, tiny_model


def known(key: str) -> bool:
    return metric_info(key).description != "as reported by the evaluation"


def test_every_computed_figure_has_a_name():
    model = tiny_model()
    batches = [random_batch(batch_size=6, seed=seed) for seed in range(2)]
    figures = evaluate_model(
        model,
        batches,
        num_importance_samples=3,
        progress=False,
        priors=("fitted", "scaled"),
        generator=torch.Generator().manual_seed(0),
    )
    monitored = latent_statistics(model, batches)
    settings = {"num_sentences", "num_tokens", "scale_factor_min", "scale_factor_max"}
    unnamed = [key for key in [*figures, *monitored] if key not in settings and not known(key)]
    assert not unnamed, unnamed
    assert metric_info("nll_fitted").label == "IW-NLL (nats/sentence), fitted prior"
    assert metric_info("no_such_figure").name == "no_such_figure"


def test_every_place_that_shows_figures_reads_the_table():
    shown = [
        *card.CARD_METRICS,
        *card.EXTRA_METRICS,
        *quickstart.TABLE_ROWS,
        *compare.COLUMNS,
        *compare.README_COLUMNS,
        *(key for keys, _ in plots.CURVES for key in keys),
    ]
    assert all(known(key) for key in shown), [key for key in shown if not known(key)]
    rendered = card.render_model_card(tiny_model(), metrics={"nll": 30.0, "shuffle_gap": 1.5})
    assert f"| {METRICS['nll'].name} | 30.00 | {METRICS['nll'].description} |" in rendered
    assert METRICS["shuffle_gap"].description in rendered
    table = quickstart.format_table({"scale": {"metrics": {"nll": 30.0}, "timing": {"steps": 5}}})
    assert METRICS["nll"].label in table and METRICS["steps"].label in table
