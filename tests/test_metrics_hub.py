"""The text-level metrics as local `evaluate` modules (scalevae/metrics_hub): they load offline from the package, give
the figures of the functions they wrap, and serve a Trainer's compute_metrics."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from scalevae.claims import consistency_figures, distinct_n, few_label_probe, self_bleu
from scalevae.metrics import reconstruction_bleu
from scalevae.metrics_hub import METRIC_MODULES, make_compute_metrics, metric_path

evaluate = pytest.importorskip("evaluate")

TEXTS = ["the cat sat on the mat .", "the cat sat on the hat .", "a dog ran in the park .", "nothing in common"]


def test_every_module_loads_offline_from_the_package_in_a_fresh_process():
    code = (
        "import evaluate\n"
        "from scalevae.metrics_hub import METRIC_MODULES, metric_path\n"
        "for name in METRIC_MODULES:\n"
        "    module = evaluate.load(metric_path(name))\n"
        "    print(name, type(module).__name__)\n"
        "print(evaluate.load(metric_path('self_bleu')).compute(predictions=['a b c d', 'a b c d'])['self_bleu'])\n"
    )
    # No network: the Hub is declared offline and every proxy points nowhere.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == list(METRIC_MODULES)
    assert float(lines[-1]) == pytest.approx(100.0)


def test_modules_give_the_figures_of_the_functions_they_wrap():
    references = ["the cat sat on the mat .", "a dog ran in the park ."]
    hypotheses = ["the cat sat on a mat .", "a dog ran in the park ."]
    bleu = evaluate.load(metric_path("reconstruction_bleu")).compute(predictions=hypotheses, references=references)
    assert bleu == {"bleu": pytest.approx(reconstruction_bleu(references, hypotheses))}
    distinct = evaluate.load(metric_path("distinct_n")).compute(predictions=TEXTS, orders=[1, 2, 3])
    assert distinct == {f"distinct_{n}": pytest.approx(distinct_n(TEXTS, n)) for n in (1, 2, 3)}
    assert evaluate.load(metric_path("self_bleu")).compute(predictions=TEXTS) == {
        "self_bleu": pytest.approx(self_bleu(TEXTS))
    }
    z = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)).double()
    z_hat = z + 0.3 * torch.randn(200, 3, generator=torch.Generator().manual_seed(1)).double()
    consistency = evaluate.load(metric_path("latent_consistency")).compute(
        predictions=z_hat.tolist(), references=z.tolist()
    )
    assert consistency == {key: pytest.approx(value) for key, value in consistency_figures(z, z_hat).items()}
    g = np.random.default_rng(0)
    x, x_test = g.standard_normal((400, 4)), g.standard_normal((300, 4))
    y, y_test = np.where(x[:, 0] > 0, "pos", "neg"), np.where(x_test[:, 0] > 0, "pos", "neg")
    probe = evaluate.load(metric_path("few_label_probe")).compute(
        latents=x_test.tolist(), labels=list(y_test), train_latents=x, train_labels=y, sizes=[20, 200]
    )
    expected = few_label_probe(x, y, x_test, y_test, sizes=(20, 200))
    assert probe["accuracy_200"] == pytest.approx(expected[200][0]) and probe["accuracy_200"] > 0.95
    assert probe["accuracy_20_sd"] == pytest.approx(expected[20][1])
    with pytest.raises(ValueError, match="not one of"):
        metric_path("bleu")


def test_compute_metrics_serves_the_trainer(tmp_path, tiny_encoder_path):
    from transformers import Trainer, TrainingArguments

    setup = __import__("tests.model_tester", fromlist=["tester"]).tester.get_trainer_setup(tiny_encoder_path)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=16, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(
        model=setup.model,
        args=args,
        eval_dataset=setup.data["validation"],
        data_collator=setup.collator,
        **make_compute_metrics(setup.decoder_tokenizer),
    )
    figures = trainer.evaluate()
    assert 0 <= figures["eval_token_accuracy"] <= 1 and 0 <= figures["eval_teacher_forced_bleu"] <= 100
    assert "eval_loss" in figures
