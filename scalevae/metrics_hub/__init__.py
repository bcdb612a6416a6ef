"""The text-level metrics of scalevae as local `evaluate` modules, loaded offline from the installed package (no Hub
fetch): `evaluate.load(scalevae.metrics_hub.metric_path("self_bleu"))`. Each module is a thin `evaluate.Metric` over
the one implementation in `scalevae.claims` / `scalevae.metrics`.

The density figures (IW-NLL, ELBO, KL, mutual information, active units) are not modules: they need the model itself
(its encoder's posterior for every sentence, its decoder's likelihood at sampled latents, its prior's density), not a
list of predictions and references, so they stay the model-side functions of `scalevae.metrics`.
"""

from pathlib import Path

METRIC_MODULES = ("reconstruction_bleu", "distinct_n", "self_bleu", "latent_consistency", "few_label_probe")


def metric_path(name: str) -> str:
    """The folder of the local `evaluate` module `name` (one of `METRIC_MODULES`), for `evaluate.load`."""
    if name not in METRIC_MODULES:
        raise ValueError(f"{name!r} is not one of scalevae's evaluate modules {METRIC_MODULES}.")
    return str(Path(__file__).resolve().parent / name)


def make_compute_metrics(decoder_tokenizer):
    """`compute_metrics` and `preprocess_logits_for_metrics` for a `Trainer` evaluating a Scale-VAE: `Trainer(...,
    **make_compute_metrics(decoder_tokenizer))` adds `eval_token_accuracy` and `eval_teacher_forced_bleu`.

    A Trainer's evaluation sees teacher-forced logits only, so these are teacher-forced figures: the accuracy of the
    argmax next token from z sampled as in training, and the corpus BLEU of those argmax tokens against each sentence.
    Reconstruction BLEU proper (greedy decoding from the latent, no teacher forcing) needs generation:
    `scalevae.metrics.reconstruction_bleu_of`, or this package's `reconstruction_bleu` module on `LatentText` outputs.
    """
    import evaluate
    import numpy as np

    bleu = evaluate.load(metric_path("reconstruction_bleu"))

    def preprocess_logits_for_metrics(outputs, labels):
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        return logits.argmax(-1)  # keep (batch, length) ids, not the (batch, length, vocabulary) logits

    def compute_metrics(prediction):
        predicted, labels = prediction.predictions, prediction.label_ids
        predicted = predicted[0] if isinstance(predicted, (tuple, list)) else predicted
        counted = labels != -100
        hypotheses = [
            decoder_tokenizer.decode(row[mask], skip_special_tokens=True) for row, mask in zip(predicted, counted)
        ]
        references = [
            decoder_tokenizer.decode(row[mask], skip_special_tokens=True) for row, mask in zip(labels, counted)
        ]
        return {
            "token_accuracy": float(np.mean(predicted[counted] == labels[counted])) if counted.any() else float("nan"),
            "teacher_forced_bleu": bleu.compute(predictions=hypotheses, references=references)["bleu"],
        }

    return {"compute_metrics": compute_metrics, "preprocess_logits_for_metrics": preprocess_logits_for_metrics}
