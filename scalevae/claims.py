"""The paper's claims beyond density, each measured the field's way, for one trained model: representation with few
labels, consistency of the latent space, and generation from the prior. Pure functions over a model, its tokenizers and
texts; `evaluate_claims` runs them all and returns flat figures named in `scalevae.metrics.METRICS`.

Definitions (the README repeats them):

* **Few-label probe** (Li et al. 2019, DU-VAE's protocol): the model is frozen; the features of a sentence are its
  posterior mean μ (and, separately, the decoder's latent f ⊙ μ). For each N, 5 random class-balanced subsets of N
  labelled training sentences train a logistic regression (scikit-learn, L2 with C = 1, features standardised on the
  subset); each is scored on the whole test split; the figure is the mean and sd of the 5 accuracies. (Li et al.
  train a linear layer by Adam with early stopping on validation; a converged L2 logistic regression is its
  deterministic analogue. Standardisation makes the probe blind to a per-dimension scale, so μ and f ⊙ μ score alike
  up to rounding: a linear probe cannot tell Scale-VAE's scaling apart.)
* **Consistency of the latent space** (the paper's text is unavailable; this is our definition): does decoding a latent
  and encoding the text give the latent back? Two cycles: *prior*: z ~ p(z), x̂ = greedy decoding of z,
  ẑ = the decoder's posterior mean of x̂; *data*: z = the decoder's posterior mean of a test sentence x, then x̂ and ẑ
  as before. The figure of each cycle, `top1`, is the share of the N cycles whose ẑ is, by cosine similarity after
  subtracting each set's mean, closest to its own z among all N (1 for a perfect cycle, 1/N by chance): each
  sentence counts once. An R² (the share of z's variance a linear map of ẑ explains) was dropped because it misleads:
  it weighs directions by their variance, and a latent whose variance lies in one or two coarse directions that any
  generic decoding keeps scores high while the sentences do not come back (free bits on Yelp: R² 0.90, 97% of the
  variance in two principal directions, 133 distinct reconstructions of 1,000 sentences, top-1 0.010).
* **Generation** over the N prior latents of the prior cycle, decoded by seeded nucleus sampling (top-p 0.9, the
  field's protocol; `NUCLEUS_DECODING`): `forward_ppl`, their perplexity under a reference language model trained on
  the training split (`train_language_model`); `reverse_ppl`, the perplexity of the real test split under a language
  model of the same size trained on the samples; `distinct_n`, distinct n-grams / all n-grams over all samples (Li et
  al. 2016); `self_bleu`, the mean sentence BLEU-4 of each sample against all the others (Zhu et al. 2018; sacreBLEU,
  smoothing "exp"); `repetition`, the share of samples that stutter (`repetition_rate`: a word three times in a row);
  `mean_length`, decoder tokens per sample, against the data's (test sentences, cut to `max_length` as the model saw
  them). Tokens for distinct-n, self-BLEU and the repetition rate are sacreBLEU's 13a tokens.
* **Fluency of reconstructions**: the data cycle's greedy decodings of the test sentences, scored like the samples
  (`recon_ppl` under the reference language model, `recon_repetition`).
"""

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .latent import LatentText, encoded_batches, evaluating, posterior_means
from .metrics import PROBE_SIZES

PROBE_FEATURES = ("mu", "decoder_mu")
# Generation figures decode prior samples the field's way: nucleus sampling (Holtzman et al. 2020), top-p 0.9 with no
# top-k cut, seeded. Greedy decoding stays for the consistency cycles, where a text must be a function of its latent;
# greedy prior samples of a VAE are near-identical sentences that forward perplexity rewards.
NUCLEUS_DECODING = dict(do_sample=True, top_p=0.9, top_k=0)
# A word three times in a row ("object object object") is what a reader calls stuttering.
REPETITION_RUN = 3

__all__ = [
    "NUCLEUS_DECODING",
    "PROBE_SIZES",
    "consistency_figures",
    "distinct_n",
    "evaluate_claims",
    "few_label_probe",
    "language_model_perplexity",
    "latent_codec",
    "mean_token_length",
    "repetition_rate",
    "reverse_perplexity",
    "self_bleu",
    "train_language_model",
]


# ---------------------------------------------------------------------------------------------------------------------
# Representation: the few-label probe
# ---------------------------------------------------------------------------------------------------------------------


def few_label_probe(
    train_features,
    train_labels: Sequence,
    test_features,
    test_labels: Sequence,
    sizes: Sequence[int] = PROBE_SIZES,
    repeats: int = 5,
    seed: int = 0,
) -> dict[int, tuple[float, float]]:
    """N -> (mean, sd) of the test accuracy of a logistic regression trained on `repeats` random class-balanced subsets
    of N labelled training examples (N // classes of each class; see the module's definition). A size that needs more
    examples of a class than the training set holds gives (nan, nan). `sd` is the sample standard deviation (ddof 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = _as_array(train_features), _as_array(test_features)
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("features and labels must have the same number of rows.")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise ValueError("the probe needs at least two classes among the training labels.")
    members = {c: np.flatnonzero(y_train == c) for c in classes}
    results = {}
    for size in sizes:
        per_class = size // len(classes)
        if per_class < 1 or any(len(rows) < per_class for rows in members.values()):
            results[size] = (math.nan, math.nan)
            continue
        accuracies = []
        for repeat in range(repeats):
            rng = np.random.default_rng([seed, size, repeat])
            rows = np.concatenate([rng.choice(members[c], per_class, replace=False) for c in classes])
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            probe.fit(x_train[rows], y_train[rows])
            accuracies.append(float(probe.score(x_test, y_test)))
        sd = float(np.std(accuracies, ddof=1)) if repeats > 1 else 0.0
        results[size] = (float(np.mean(accuracies)), sd)
    return results


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Consistency of the latent space
# ---------------------------------------------------------------------------------------------------------------------


def consistency_figures(latents, recovered) -> dict[str, float]:
    """`top1` of a cycle (see the module's definition): `latents` are the N starting latents z (N, d), `recovered` the
    ẑ the cycle gave back (N, d), row for row."""
    z, z_hat = _as_array(latents), _as_array(recovered)
    if z.shape != z_hat.shape or z.ndim != 2 or len(z) < 2:
        raise ValueError(f"latents and recovered must both be (N >= 2, d); got {z.shape} and {z_hat.shape}.")
    return {"top1": top1_retrieval(z, z_hat)}


def top1_retrieval(latents, recovered) -> float:
    """The share of rows i whose `recovered[i]` is closest, by cosine similarity after subtracting each set's mean, to
    `latents[i]` among all rows of `latents` (ties count as misses)."""
    z, z_hat = _as_array(latents), _as_array(recovered)
    z, z_hat = z - z.mean(0), z_hat - z_hat.mean(0)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-300)
    z_hat = z_hat / np.maximum(np.linalg.norm(z_hat, axis=1, keepdims=True), 1e-300)
    similarity = z_hat @ z.T  # (N recovered, N candidates)
    own = np.diagonal(similarity)
    others = similarity.copy()
    np.fill_diagonal(others, -np.inf)
    return float(np.mean(own > others.max(1)))


def latent_codec(model, encoder_tokenizer, decoder_tokenizer, max_length: int = 32, batch_size: int = 100):
    """(encode, decode) of a trained model, the two halves of a cycle: `encode(texts)` gives the decoder's posterior
    means (N, d) (an empty text is encoded with no token, so every empty decoding gets the same latent); `decode(z)`
    greedy-decodes up to `max_length` tokens from each latent, and `decode(z, seed=s)` samples them by nucleus
    sampling (`NUCLEUS_DECODING`) from a random state seeded with s (the caller's state is left as it was). Both in
    eval mode, in batches of `batch_size`."""
    text = LatentText(model, encoder_tokenizer, decoder_tokenizer, max_length=max_length)

    def encode(texts: Sequence[str]) -> torch.Tensor:
        return posterior_means(model, encoded_batches(encoder_tokenizer, texts, max_length, batch_size))[1]

    def decode(latents: torch.Tensor, seed: int | None = None) -> list[str]:
        decoding = dict(do_sample=False) if seed is None else NUCLEUS_DECODING
        with (
            evaluating(model),
            torch.no_grad(),
            torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []),
        ):
            if seed is not None:
                torch.manual_seed(seed)
            return [
                out
                for start in range(0, len(latents), batch_size)
                for out in text.decode(latents[start : start + batch_size], **decoding)
            ]

    return encode, decode


def prior_cycle(sample: Callable[[int], torch.Tensor], encode, decode, num_samples: int):
    """z ~ p(z) (`sample(n)`), x̂ = decode(z), ẑ = encode(x̂): returns (z, x̂, ẑ)."""
    latents = sample(num_samples).float().cpu()
    texts = decode(latents)
    return latents, texts, encode(texts)


def data_cycle(texts: Sequence[str], encode, decode):
    """z = encode(x), x̂ = decode(z), ẑ = encode(x̂) for the given sentences: returns (z, x̂, ẑ)."""
    latents = encode(texts)
    decoded = decode(latents)
    return latents, decoded, encode(decoded)


# ---------------------------------------------------------------------------------------------------------------------
# Generation: diversity, length, and perplexities under language models
# ---------------------------------------------------------------------------------------------------------------------


def _bleu_tokens(texts: Sequence[str]) -> list[list[str]]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    return [tokenize(text.rstrip()).split() for text in texts]


def repetition_rate(texts: Sequence[str], run: int = REPETITION_RUN) -> float:
    """The share of texts in which one word occurs `run` times in a row ("the the the"; words are 13a tokens holding a
    letter or a digit, compared case-folded, so "..." or "! ! !" do not count). The one definition of stuttering that
    every command reports; NaN for no texts."""
    texts = list(texts)
    if not texts:
        return math.nan
    if isinstance(run, bool) or not isinstance(run, int) or run < 2:
        raise ValueError(f"run={run!r} must be a whole number >= 2.")

    def stutters(tokens: list[str]) -> bool:
        length = 1
        for previous, token in zip(tokens, tokens[1:]):
            length = length + 1 if token.casefold() == previous.casefold() and any(c.isalnum() for c in token) else 1
            if length >= run:
                return True
        return False

    return sum(stutters(tokens) for tokens in _bleu_tokens(texts)) / len(texts)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over all texts (13a tokens); 0 when the texts hold no n-gram."""
    grams = [tuple(tokens[i : i + n]) for tokens in _bleu_tokens(texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str], max_order: int = 4) -> float:
    """The mean over texts of `sacrebleu.sentence_bleu(text, all other texts)` (0-100), computed in one pass: each
    n-gram's clipping count against "all the others" is its largest count in any other text, so keeping the two largest
    counts of every n-gram gives every text's statistics without rescanning the set."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    texts = list(texts)
    if len(texts) < 2:
        raise ValueError("self-BLEU needs at least two texts.")
    extracted = [extract_all_word_ngrams(" ".join(tokens), 1, max_order) for tokens in _bleu_tokens(texts)]
    top = {}  # n-gram -> (largest count, its text, second largest count)
    for index, (grams, _) in enumerate(extracted):
        for gram, count in grams.items():
            best, owner, second = top.get(gram, (0, -1, 0))
            if count > best:
                top[gram] = (count, index, best)
            elif count > second:
                top[gram] = (best, owner, count)
    length_counts = Counter(length for _, length in extracted)
    lengths = sorted(length_counts)
    scores = []
    for index, (grams, length) in enumerate(extracted):
        others = [ref for ref in lengths if ref != length or length_counts[ref] > 1]
        ref_len = min(others, key=lambda ref: (abs(ref - length), ref))  # sacreBLEU's closest, the shorter on ties
        correct, total = [0] * max_order, [0] * max_order
        for gram, count in grams.items():
            best, owner, second = top[gram]
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, second if owner == index else best)
        scores.append(
            BLEU.compute_bleu(
                correct, total, length, ref_len, smooth_method="exp", effective_order=True, max_ngram_order=max_order
            ).score
        )
    return float(np.mean(scores))


def mean_token_length(texts: Sequence[str], decoder_tokenizer, max_length: int | None = None) -> float:
    """Mean number of decoder tokens per text (no special tokens), each cut to `max_length - 1` when given: the
    tokens the model sees of a training sentence (`scalevae.data.tokenize_texts` keeps max_length - 1 and adds EOS)."""
    ids = decoder_tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    cap = max_length - 1 if max_length else None
    return float(np.mean([len(row) if cap is None else min(len(row), cap) for row in ids])) if ids else math.nan


def _lm_rows(texts, decoder_tokenizer, max_length: int) -> list[dict]:
    """A plain language model's rows with the VAE's token rule: BOS, the text's tokens cut to max_length - 1, EOS;
    the counted tokens (labels) are the text's tokens and EOS, never BOS."""
    from .factory import decoder_special_token_ids

    bos, eos = decoder_special_token_ids(decoder_tokenizer)
    rows = []
    for ids in decoder_tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = [bos, *ids[: max_length - 1], eos]
        rows.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
    return rows


def train_language_model(
    texts,
    decoder_tokenizer,
    decoder_config,
    max_length: int = 32,
    max_steps: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    output_dir: str | None = None,
):
    """A plain GPT-2 of `decoder_config`'s size (a copy of the VAE's decoder config: layers, width, heads, positions,
    vocabulary, dropout), newly initialised and trained with the stock `Trainer` on `texts` (a list of strings, or a
    tokenized split holding the VAE's `labels` column) with the VAE's token rule. Constant learning rate after a 5%
    warm-up, AdamW without weight decay: the VAE recipe's optimiser. Returns the model in eval mode; `output_dir`,
    if given, receives it (`save_pretrained`) and the tokenizer."""
    import tempfile

    from transformers import (
        DataCollatorForSeq2Seq,
        GPT2Config,
        GPT2LMHeadModel,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from .factory import decoder_special_token_ids

    if hasattr(texts, "column_names") and "labels" in texts.column_names:
        bos, _ = decoder_special_token_ids(decoder_tokenizer)
        rows = [{"input_ids": [bos, *labels], "labels": [-100, *labels]} for labels in texts["labels"]]
    else:
        rows = _lm_rows(texts, decoder_tokenizer, max_length)
    set_seed(seed)
    config = GPT2Config.from_dict(decoder_config.to_dict())
    config.vocab_size = max(config.vocab_size, len(decoder_tokenizer))
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=max(1, max_steps // 20),
            lr_scheduler_type="constant_with_warmup",
            weight_decay=0.0,
            logging_steps=max(1, max_steps // 10),
            report_to=[],
            save_strategy="no",
            seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        collator = DataCollatorForSeq2Seq(decoder_tokenizer, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # a comparison's one bar is the output; the LM's log stays quiet
        trainer.train()
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        decoder_tokenizer.save_pretrained(output_dir)
    return model


@torch.no_grad()
def language_model_perplexity(
    language_model, decoder_tokenizer, texts: Sequence[str], max_length: int = 32, batch_size: int = 64
) -> float:
    """exp(total NLL / counted tokens) of `texts` under a causal language model, with the VAE's token rule (counted
    tokens: each text's tokens, cut to max_length - 1, and its EOS)."""
    from transformers import DataCollatorForSeq2Seq

    rows = _lm_rows(texts, decoder_tokenizer, max_length)
    collator = DataCollatorForSeq2Seq(decoder_tokenizer, label_pad_token_id=-100)
    device = next(language_model.parameters()).device
    was_training = language_model.training
    language_model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator(rows[start : start + batch_size])
            logits = language_model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits[:, :-1]
            labels = batch["labels"][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            total += float(nll)
            count += int((labels != -100).sum())
    finally:
        language_model.train(was_training)
    return math.exp(total / count) if count else math.nan


def reverse_perplexity(
    samples: Sequence[str],
    test_texts: Sequence[str],
    decoder_tokenizer,
    decoder_config,
    max_length: int = 32,
    max_steps: int = 300,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """The perplexity of the real `test_texts` under a language model of the decoder's size trained on the generated
    `samples` (`train_language_model`): high when the samples miss part of the data's distribution. With 1,000 samples
    the model overfits them, so compare it between models of one comparison, not with published figures (Zhao et al.
    2018 train on 100,000)."""
    language_model = train_language_model(
        samples, decoder_tokenizer, decoder_config, max_length, max_steps, batch_size, seed=seed
    )
    return language_model_perplexity(language_model, decoder_tokenizer, test_texts, max_length)


# ---------------------------------------------------------------------------------------------------------------------
# Everything for one trained run
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_claims(
    model,
    encoder_tokenizer,
    decoder_tokenizer,
    texts: Mapping[str, Sequence[str]],
    labels: Mapping[str, Sequence] | None = None,
    reference_lm=None,
    seed: int = 0,
    num_prior_samples: int = 1000,
    probe_sizes: Sequence[int] = PROBE_SIZES,
    probe_repeats: int = 5,
    num_cycle_sentences: int = 1000,
    max_length: int = 32,
    reverse_lm_steps: int = 0,
    batch_size: int = 100,
    prior: str | None = None,
) -> dict[str, float]:
    """The representation, consistency and generation figures of one trained model (see the module's definitions), as
    flat keys named in `scalevae.metrics.METRICS`.

    `texts`: `"train"` and `"test"` sentences (train: the probe's labelled pool and nothing else; test: the probe's test
    set, the data cycle's first `num_cycle_sentences` and the reverse-PPL test set); `labels`: the `"train"` and
    `"test"` classes, row for row (no labels: no probe figures). `reference_lm`: the comparison's language model
    (`train_language_model` on the training split), for `gen_forward_ppl`; `reverse_lm_steps` > 0 trains the reverse
    language model that many steps for `gen_reverse_ppl` (off by default; the `yelp-cpu` preset runs 200, about 25 s
    of a 2x256 GPT-2 on 2 CPU cores). `prior` overrides `config.prior` for the prior samples; `seed` seeds them and
    the probe's subsets. The model is left in the mode it came in.
    """
    encode, decode = latent_codec(model, encoder_tokenizer, decoder_tokenizer, max_length, batch_size)
    figures: dict[str, float] = {}

    if labels:
        pool = list(texts["train"])[: len(labels["train"])]
        test = list(texts["test"])[: len(labels["test"])]
        with evaluating(model), torch.no_grad():
            train_posterior = dict(
                zip(
                    PROBE_FEATURES,
                    posterior_means(model, encoded_batches(encoder_tokenizer, pool, max_length, batch_size)),
                )
            )
            test_posterior = dict(
                zip(
                    PROBE_FEATURES,
                    posterior_means(model, encoded_batches(encoder_tokenizer, test, max_length, batch_size)),
                )
            )
        for feature in PROBE_FEATURES:
            accuracy = few_label_probe(
                train_posterior[feature],
                list(labels["train"])[: len(pool)],
                test_posterior[feature],
                list(labels["test"])[: len(test)],
                probe_sizes,
                probe_repeats,
                seed,
            )
            for size, (mean, sd) in accuracy.items():
                figures[f"probe_{size}_{feature}"], figures[f"probe_{size}_{feature}_sd"] = mean, sd

    generator = torch.Generator().manual_seed(seed)
    with evaluating(model), torch.no_grad():
        prior_latents, _, z_hat = prior_cycle(
            lambda n: model.sample_prior(n, generator=generator, prior=prior).cpu(), encode, decode, num_prior_samples
        )
    figures |= {f"consistency_prior_{key}": value for key, value in consistency_figures(prior_latents, z_hat).items()}
    z, reconstructions, z_hat = data_cycle(list(texts["test"])[:num_cycle_sentences], encode, decode)
    figures |= {f"consistency_data_{key}": value for key, value in consistency_figures(z, z_hat).items()}
    figures["recon_repetition"] = repetition_rate(reconstructions)

    # The generation figures: the prior cycle's latents again, decoded by seeded nucleus sampling.
    samples = decode(prior_latents, seed=seed)
    figures["gen_distinct_1"] = distinct_n(samples, 1)
    figures["gen_distinct_2"] = distinct_n(samples, 2)
    figures["gen_self_bleu"] = self_bleu(samples)
    figures["gen_repetition"] = repetition_rate(samples)
    figures["gen_mean_length"] = mean_token_length(samples, decoder_tokenizer)
    figures["data_mean_length"] = mean_token_length(texts["test"], decoder_tokenizer, max_length)
    if reference_lm is not None:
        figures["gen_forward_ppl"] = language_model_perplexity(reference_lm, decoder_tokenizer, samples, max_length)
        figures["recon_ppl"] = language_model_perplexity(reference_lm, decoder_tokenizer, reconstructions, max_length)
    if reverse_lm_steps:
        figures["gen_reverse_ppl"] = reverse_perplexity(
            samples,
            texts["test"],
            decoder_tokenizer,
            model.config.decoder,
            max_length,
            reverse_lm_steps,
            seed=seed,
        )
    return figures
