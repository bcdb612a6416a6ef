"""The run recipe's evaluation, and `scalevae evaluate`'s: the field's figures of a model on each split of a run's
data (`evaluate_model` under each prior, reconstruction BLEU, a linear probe of labelled latents), with the paper's
other claims (`scalevae.claims`) and the control measurement (`scalevae.control`) on the test split when asked."""

from pathlib import Path

import torch

from .claims import evaluate_claims, language_model_perplexity
from .control import TextClassifier, evaluate_control
from .data import RunData
from .latent import LatentText, posterior_means
from .metrics import evaluate_model, linear_probe_accuracy, reconstruction_bleu_of
from .training import fit_prior_families, prior_fit_batches


def split_figures(
    model,
    data: RunData,
    split: str,
    num_importance_samples: int,
    priors=(),
    seed: int = 0,
    bleu_sentences: int | None = None,
    max_length: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """One split's figures, for the recipe and `scalevae evaluate` alike: `evaluate_model` under the model's prior and
    `priors` (`evaluate_model`'s: names, or name -> a prior fitted apart), from the same importance samples; the greedy
    reconstruction BLEU of the first `bleu_sentences` texts (None: all); for labelled data, the linear probe of both
    posterior means."""
    loader = data.loader(split, batch_size)
    metrics = evaluate_model(
        model,
        loader,
        num_importance_samples=num_importance_samples,
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
        priors=priors,
    )
    metrics["bleu"] = reconstruction_bleu_of(
        model, data.texts[split][:bleu_sentences], data.encoder_tokenizer, data.decoder_tokenizer, max_length
    )
    if split in data.labels:
        mu, decoder_mu = posterior_means(model, loader)
        metrics["probe_mu"] = linear_probe_accuracy(mu, data.labels[split], seed=seed)
        metrics["probe_decoder_mu"] = linear_probe_accuracy(decoder_mu, data.labels[split], seed=seed)
    return metrics


def evaluate(
    spec,
    data: RunData,
    model,
    seed: int | None = None,
    progress: bool = True,
    reference_lm=None,
    classifier=None,
) -> dict:
    """The field's figures on each of `spec.run.eval_splits` that the data holds: `evaluate_model` (IW-NLL, ELBO,
    KL, MI, AU, token accuracy, shuffle gap) under each prior, reconstruction BLEU, for labelled data a linear probe of
    the latents, and with `spec.run.claims` the test split's representation, consistency and generation figures
    (`scalevae.claims.evaluate_claims`; `reference_lm` scores the samples' forward perplexity), and with
    `spec.run.control` the attribute edits of `scalevae.control.evaluate_control`, judged by `classifier`."""
    seed = spec.training.seed if seed is None else seed
    model.eval()
    # Families the model does not hold are fitted apart and scored in the same pass (an AE has no density to score).
    others = [family for family in spec.run.priors if family in ("full", "mixture") and family != model.config.prior]
    priors = dict.fromkeys(p for p in spec.run.priors if p not in others)
    if others and model.collapse.stochastic:
        batches = prior_fit_batches(data.dataset["train"], data.collator, spec.run.prior_fit_sentences)
        priors |= fit_prior_families(model, batches, others, seed)
    results = {}
    for split in spec.run.eval_splits:
        if split not in data.dataset:
            continue
        metrics = split_figures(
            model,
            data,
            split,
            num_importance_samples=spec.run.num_importance_samples,
            priors=priors,
            seed=seed,
            bleu_sentences=spec.run.bleu_sentences,
            max_length=spec.data.max_length,
            progress=progress,
        )
        if spec.run.claims and split == "test":
            metrics.update(
                evaluate_claims(
                    model,
                    data.encoder_tokenizer,
                    data.decoder_tokenizer,
                    data.texts,
                    labels=data.labels or None,
                    reference_lm=reference_lm,
                    seed=seed,
                    num_prior_samples=spec.run.claims_prior_samples,
                    max_length=spec.data.max_length,
                    reverse_lm_steps=spec.run.reverse_lm_steps,
                )
            )
        if spec.run.control and split == "test" and split in data.labels:

            def fluency(texts):
                return language_model_perplexity(reference_lm, data.decoder_tokenizer, texts, spec.data.max_length)

            metrics.update(
                evaluate_control(
                    LatentText(model, data.encoder_tokenizer, data.decoder_tokenizer, max_length=spec.data.max_length),
                    data.texts[split],
                    data.labels[split],
                    classifier or text_classifier(data),
                    fluency=fluency if reference_lm is not None else None,
                    num_sentences=spec.run.control_sentences,
                    seed=seed,
                    train_texts=data.texts["train"],
                    train_labels=data.labels["train"],
                )
            )
        results[split] = metrics
    return results


def text_classifier(data: RunData, path: Path | None = None):
    """The control measurement's judge: a classifier of the text itself (TF-IDF + logistic regression, not any VAE's
    latent) trained on the labelled training split; kept at `path` so a comparison trains it once."""
    if path is not None and path.is_file():
        return TextClassifier.load(path)
    classifier = TextClassifier.fit(data.texts["train"], data.labels["train"])
    if "test" in data.labels:
        classifier.test_accuracy = classifier.accuracy(data.texts["test"], data.labels["test"])
    if path is not None:
        classifier.save(path)
    return classifier
