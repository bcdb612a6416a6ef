"""Control through the latent, measured on the text: an independent text classifier (`TextClassifier`, TF-IDF and
logistic regression, never a VAE's latent), and `evaluate_control`, which flips each test sentence's class by moving
its latent along an attribute direction fitted on training sentences and reports, per strength, how often the
classifier agrees (transfer accuracy), how much of the sentence is kept (BLEU to the source) and, given a language
model, how fluent the edits are (perplexity). Also the jobs behind `scalevae edit` and `scalevae generate --label`
(`edit_command`, `generate_label`), with plain arguments.
"""

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .claims import repetition_rate
from .data import read_labelled, read_texts
from .factory import resolve_device
from .latent import AttributeDirection, LatentText, evaluating
from .metrics import reconstruction_bleu

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The strengths of the curve, in units of the attribute's spread (1: the gap between the two class means). 0 is the
# reconstruction: the floor of transfer and the ceiling of BLEU.
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
# Edits are decoded greedily, blocking repeated trigrams as the quickstart prints text: a looping decoder would
# otherwise score a low perplexity on its own repetitions.
EDIT_DECODING = dict(do_sample=False, no_repeat_ngram_size=3)
TRANSFER_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Labelled text files
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# The independent classifier
# ---------------------------------------------------------------------------------------------------------------------


class TextClassifier:
    """A text classifier that never sees a latent: TF-IDF of word 1-2-grams (whitespace tokens, as the Yelp files
    are tokenized) and of character 2-5-grams within words (min. 2 documents), sublinear term frequency, then an L2
    logistic regression with C = 10 (chosen on yelp_sentiment.valid among 1, 3, 10: 0.929, 0.933, 0.942).

    Saved as one `.npz` of vocabularies, weights and settings (`save` / `load`), without pickle: loading a file
    runs no code. `test_accuracy` is the held-out accuracy recorded by `sentiment_classifier`.
    """

    WORD = dict(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"\S+", lowercase=True)
    CHAR = dict(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, lowercase=True)
    C = 10.0

    def __init__(self, pipeline, test_accuracy: float | None = None):
        self.pipeline = pipeline
        self.test_accuracy = test_accuracy

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(c) for c in self.pipeline[-1].classes_)

    @classmethod
    def _build(cls, word_vocabulary=None, char_vocabulary=None):
        try:
            import sklearn  # noqa: F401
        except ImportError as error:
            raise ImportError("the control classifier needs scikit-learn: pip install 'scalevae[probe]'.") from error
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union

        features = make_union(
            TfidfVectorizer(**cls.WORD, vocabulary=word_vocabulary),
            TfidfVectorizer(**cls.CHAR, vocabulary=char_vocabulary),
        )
        return make_pipeline(features, LogisticRegression(C=cls.C, max_iter=2000))

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence) -> "TextClassifier":
        texts, labels = list(texts), [str(label).strip() for label in labels]
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels: give one label per text.")
        if len(set(labels)) < 2:
            raise ValueError(f"the labels hold one class ({labels[0] if labels else None!r}): a classifier needs two.")
        return cls(cls._build().fit(texts, labels))

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [str(label) for label in self.pipeline.predict(list(texts))]

    def accuracy(self, texts: Sequence[str], labels: Sequence) -> float:
        predicted = self.predict(texts)
        labels = [str(label).strip() for label in labels]
        if len(predicted) != len(labels):
            raise ValueError(f"{len(predicted)} texts but {len(labels)} labels.")
        return sum(p == y for p, y in zip(predicted, labels)) / len(labels)

    def save(self, path: str | Path) -> Path:
        import numpy as np

        path = Path(path)
        (word, char), model = [v for _, v in self.pipeline[0].transformer_list], self.pipeline[-1]
        arrays = {}
        for name, vectorizer in (("word", word), ("char", char)):
            vocabulary = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
            arrays[f"{name}_vocabulary"] = np.array(vocabulary, dtype=str)
            arrays[f"{name}_idf"] = vectorizer.idf_
        info = {"format": "scalevae-text-classifier-1", "test_accuracy": self.test_accuracy}
        arrays.update(
            coef=model.coef_,
            intercept=model.intercept_,
            classes=np.array(self.labels, dtype=str),
            info=json.dumps(info),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # np.savez would append .npz to a name without it
            np.savez(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TextClassifier":
        import numpy as np

        with np.load(path, allow_pickle=False) as saved:
            info = json.loads(str(saved["info"]))
            if info.get("format") != "scalevae-text-classifier-1":
                raise ValueError(f"{path} is not a saved TextClassifier.")
            vocabularies = {
                name: {str(term): i for i, term in enumerate(saved[f"{name}_vocabulary"])} for name in ("word", "char")
            }
            pipeline = cls._build(vocabularies["word"], vocabularies["char"])
            (word, char), model = [v for _, v in pipeline[0].transformer_list], pipeline[-1]
            word.idf_, char.idf_ = saved["word_idf"], saved["char_idf"]
            model.coef_, model.intercept_ = saved["coef"], saved["intercept"]
            model.classes_ = saved["classes"].astype(object)
        return cls(pipeline, info.get("test_accuracy"))


def sentiment_classifier(data_dir: str | Path | None = None, path: str | Path | None = None) -> TextClassifier:
    """The Yelp sentiment classifier of the control measurement: trained on yelp_sentiment.train (20,000 sentences),
    its accuracy on yelp_sentiment.test recorded in `test_accuracy`. With `path`, a classifier saved there is loaded,
    or the one trained is saved there (a comparison trains it once)."""
    if path is not None and Path(path).is_file():
        return TextClassifier.load(path)
    data_dir = Path(data_dir) if data_dir is not None else SHARED_DATA
    texts, labels = read_labelled(data_dir / "yelp_sentiment.train.txt", data_dir / "yelp_sentiment.train.label")
    classifier = TextClassifier.fit(texts, labels)
    classifier.test_accuracy = classifier.accuracy(
        *read_labelled(data_dir / "yelp_sentiment.test.txt", data_dir / "yelp_sentiment.test.label")
    )
    if path is not None:
        classifier.save(path)
    return classifier


# ---------------------------------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------------------------------


def _key(name: str, strength: float) -> str:
    return f"{name}@{float(strength)}"


def _flip(direction: AttributeDirection, labels: list[str]) -> tuple[list[float], list[str]]:
    """Per text: the strength's sign that moves it to the other class, and that class."""
    signs = [1.0 if y == direction.source else -1.0 for y in labels]
    return signs, [direction.target if y == direction.source else direction.source for y in labels]


def _references(latent_text: LatentText, texts: list[str]) -> list[str]:
    """Each source as the decoder's tokenizer writes it back (as `reconstruction_bleu_of`), so casing and tokenisation
    artefacts are the same on both sides of the BLEU."""
    tokenizer = latent_text.decoder_tokenizer
    return [tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]


def evaluate_control(
    latent_text: LatentText,
    texts: Sequence[str],
    labels: Sequence,
    classifier: TextClassifier,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    fluency: Callable[[list[str]], float] | None = None,
    num_sentences: int | None = 200,
    seed: int = 0,
    *,
    train_texts: Sequence[str] | None = None,
    train_labels: Sequence | None = None,
    direction: AttributeDirection | None = None,
    num_train_sentences: int | None = 4000,
    batch_size: int = 64,
    generation_kwargs: dict | None = None,
    num_examples: int = 5,
) -> dict:
    """Flip each test sentence's class through the latent and measure the result on the text.

    The direction (`LatentText.attribute_direction`, difference of class means) is fitted on training sentences,
    never on the test ones: `direction`, or `num_train_sentences` sentences drawn from `train_texts`/`train_labels`
    with `seed` (all of them with None). The first `num_sentences` test sentences (`texts`, `labels`; all with None)
    are encoded once; at each strength s (in units of the attribute's spread: 1 moves by the gap between the class
    means), each is moved by s towards the class it does not have and decoded (`EDIT_DECODING`). Per strength:

    - `control_acc@s`: transfer accuracy, the fraction of edits that `classifier` assigns to the target class;
    - `control_bleu@s`: content kept, sacreBLEU corpus BLEU (0-100) of the edits against their sources;
    - `control_repetition@s`: the share of edits that stutter (`scalevae.claims.repetition_rate`);
    - `control_ppl@s`: fluency, `fluency(edits)` (e.g. a reference language model's perplexity), when given.

    Summary: `control_strength50`, the first strength (in increasing order) whose transfer accuracy reaches 50%, and
    `control_acc50`, `control_bleu50`, `control_repetition50`, `control_ppl50` there (NaN when none does);
    `control_acc_at_bleu1`, the transfer at equal content kept (`transfer_at_bleu`, BLEU 1); `control_separation`, the class
    gap over the within-class spread along the direction (training sentences). `control_examples`: strength ->
    the first `num_examples` (source, edit, target class) triples, as measured (not chosen by hand).
    """
    labels = [str(label).strip() for label in labels]
    texts = list(texts)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} test texts but {len(labels)} labels: give one label per text.")
    if num_sentences is not None:
        texts, labels = texts[:num_sentences], labels[:num_sentences]
    strengths = sorted(float(s) for s in strengths)
    if not strengths:
        raise ValueError("strengths is empty: give at least one strength.")
    for s in strengths:
        if not math.isfinite(s):
            raise ValueError(f"strengths must be finite, got {s}.")
    if direction is None:
        if train_texts is None or train_labels is None:
            raise ValueError(
                "evaluate_control needs the training sentences (train_texts=, train_labels=) or direction=."
            )
        train_texts, train_labels = list(train_texts), [str(label).strip() for label in train_labels]
        if len(train_texts) != len(train_labels):
            raise ValueError(f"{len(train_texts)} training texts but {len(train_labels)} labels.")
        if num_train_sentences is not None and num_train_sentences < len(train_texts):
            order = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(seed))
            keep = sorted(order[:num_train_sentences].tolist())
            train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
        direction = latent_text.attribute_direction(train_texts, train_labels, batch_size=batch_size)
    unknown = sorted(set(labels) - {direction.source, direction.target})
    if unknown:
        raise ValueError(
            f"test labels {unknown} are not the direction's classes ({direction.source!r}, {direction.target!r})."
        )
    decoding = {**EDIT_DECODING, **(generation_kwargs or {})}
    signs, targets = _flip(direction, labels)
    with evaluating(latent_text.model):
        latents = latent_text.encode_in_batches(texts, batch_size)
    references = _references(latent_text, texts)
    results, examples = {"control_separation": direction.separation}, {}
    for s in strengths:
        moved = latent_text.edit_latents(latents, direction, [s * sign for sign in signs])
        with evaluating(latent_text.model):
            edits = latent_text.decode_in_batches(moved, batch_size, **decoding)
        examples[f"{s:g}"] = [list(triple) for triple in zip(texts, edits, targets)][:num_examples]
        predicted = classifier.predict(edits)
        results[_key("control_acc", s)] = sum(p == t for p, t in zip(predicted, targets)) / len(targets)
        results[_key("control_bleu", s)] = reconstruction_bleu(references, edits)
        results[_key("control_repetition", s)] = repetition_rate(edits)
        if fluency is not None:
            results[_key("control_ppl", s)] = float(fluency(edits))
    reached = [s for s in strengths if results[_key("control_acc", s)] >= TRANSFER_THRESHOLD]
    at = reached[0] if reached else None
    results["control_strength50"] = at if at is not None else math.nan
    for name in ("acc", "bleu", "repetition", "ppl"):
        if name != "ppl" or fluency is not None:
            results[f"control_{name}50"] = results[_key(f"control_{name}", at)] if at is not None else math.nan
    results["control_acc_at_bleu1"] = transfer_at_bleu(results, 1.0)
    results["control_examples"] = examples
    return results


def control_curve(results: dict[str, float], name: str = "control_acc") -> tuple[list[float], list[float]]:
    """(strengths, values) of one per-strength figure of `evaluate_control`'s results, in increasing strength."""
    points = sorted(
        (float(key.split("@", 1)[1]), value) for key, value in results.items() if key.startswith(name + "@")
    )
    return [s for s, _ in points], [v for _, v in points]


def transfer_at_bleu(results: dict[str, float], bleu: float = 1.0) -> float:
    """Transfer accuracy at equal content kept: `evaluate_control`'s curve of (BLEU to source, transfer accuracy) over
    increasing strengths, interpolated linearly in BLEU at `bleu` where the curve first falls through it. NaN when the
    reconstructions (strength 0) already keep less than `bleu`, or no strength lowers BLEU to it."""
    strengths, accuracies = control_curve(results, "control_acc")
    _, bleus = control_curve(results, "control_bleu")
    if not strengths or bleus[0] < bleu:
        return math.nan
    for (b0, a0), (b1, a1) in zip(zip(bleus, accuracies), zip(bleus[1:], accuracies[1:])):
        if b0 >= bleu >= b1:
            return a0 if b0 == b1 else a0 + (a1 - a0) * (b0 - bleu) / (b0 - b1)
    return math.nan


def format_examples(examples: Sequence[Sequence[str]]) -> str:
    """One line per (source, edited, target class) example (`evaluate_control`'s `control_examples`): `source ->
    edited`, with the target class (Markdown-safe for the docs' code blocks)."""
    return "\n".join(f"[to {target}] {source} -> {edited}" for source, edited, target in examples)


# ---------------------------------------------------------------------------------------------------------------------
# The command-line jobs (the CLI parses arguments and calls these)
# ---------------------------------------------------------------------------------------------------------------------


def _load(model: str, device) -> LatentText:
    """The folder's `LatentText` on `device` (default: the GPU when there is one)."""
    text = LatentText.from_pretrained(model)
    try:
        text.model.to(resolve_device(device))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return text


def edit_command(
    model: str,
    labelled_file: str,
    label_file: str,
    to: str,
    strength: float,
    input_file: str | None = None,
    from_label: str | None = None,
    method: str = "mean",
    num_examples: int = 10,
    device: str | None = None,
    max_new_tokens: int | None = None,
    file=None,
) -> list[tuple[str, str]]:
    """`scalevae edit MODEL --labelled_file F --label_file L --to CLASS --strength S [--input TEXT_FILE]`: fit the
    direction towards `to` on the labelled texts, move each input text (the lines of `input_file`; without it, the
    first `num_examples` labelled texts not already of class `to`) by `strength` and print `source -> edited` pairs.
    Bad inputs exit with a message naming the flag."""
    file = file or sys.stdout
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise SystemExit(f"--strength {strength!r} is not a number.") from None
    if not math.isfinite(strength):
        raise SystemExit(f"--strength {strength} must be a finite number.")
    try:
        texts, labels = read_labelled(labelled_file, label_file)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--labelled_file/--label_file: {error}") from None
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise SystemExit(f"--label_file {label_file} holds one class ({classes[0]!r}): a direction needs two.")
    if str(to).strip() not in classes:
        raise SystemExit(f"--to {to!r} is not among the labels of {label_file} ({', '.join(classes)}).")
    if from_label is not None and str(from_label).strip() not in classes:
        raise SystemExit(
            f"--from_label {from_label!r} is not among the labels of {label_file} ({', '.join(classes)})."
        )
    if from_label is None and len(classes) > 2:
        raise SystemExit(
            f"{label_file} holds {len(classes)} classes ({', '.join(classes)}): give --from_label CLASS too."
        )
    if input_file is not None:
        try:
            inputs = read_texts(input_file)
        except (OSError, ValueError) as error:
            raise SystemExit(f"--input {input_file}: {error}") from None
    else:
        inputs = [t for t, y in zip(texts, labels) if y != str(to).strip()][:num_examples]
    text = _load(model, device)
    direction = text.attribute_direction(texts, labels, target=to, source=from_label, method=method)
    decoding = dict(EDIT_DECODING)
    if max_new_tokens is not None:
        decoding["max_new_tokens"] = max_new_tokens
    edits = text.edit(inputs, direction, strength, **decoding)
    for source, edited in zip(inputs, edits):
        print(f"{source} -> {edited}", file=file)
    return list(zip(inputs, edits))


def generate_label(
    model: str,
    sample: int,
    label: str,
    labelled_file: str | None = None,
    label_file: str | None = None,
    save_classes: bool = False,
    covariance: str = "full",
    seed: int = 0,
    device: str | None = None,
    max_new_tokens: int | None = None,
    file=None,
) -> list[str]:
    """`scalevae generate MODEL --sample N --label CLASS [--labelled_file F --label_file L [--save_classes]]`: print
    `sample` texts decoded from latents of class `label`'s Gaussian: the folder's saved ones (`latent_classes.
    safetensors`), or fitted on the labelled files (and, with `save_classes`, written into the folder). The latents
    are seeded; decoding is greedy, so the seed fixes the output. Bad inputs exit with a message naming the flag."""
    file = file or sys.stdout
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise SystemExit(f"--sample {sample!r} must be a whole number >= 1.")
    if (labelled_file is None) != (label_file is None):
        raise SystemExit("--labelled_file and --label_file go together: give both or neither.")
    if save_classes and labelled_file is None:
        raise SystemExit("--save_classes needs --labelled_file and --label_file to fit the classes on.")
    texts = labels = None
    if labelled_file is not None:
        try:
            texts, labels = read_labelled(labelled_file, label_file)
        except (OSError, ValueError) as error:
            raise SystemExit(f"--labelled_file/--label_file: {error}") from None
        if str(label).strip() not in set(labels):
            raise SystemExit(
                f"--label {label!r} is not among the labels of {label_file} ({', '.join(sorted(set(labels)))})."
            )
    text = _load(model, device)
    if texts is not None:
        try:
            text.fit_classes(texts, labels, covariance=covariance)
        except ValueError as error:
            raise SystemExit(f"--labelled_file/--label_file: {error}") from None
        if save_classes:
            try:
                print(f"wrote {text.save_classes(model)}", file=sys.stderr)
            except NotADirectoryError:
                raise SystemExit(f"--save_classes: {model} is not a local folder to write into.") from None
    elif text.classes is None:
        has = f"{model}'s latent_classes.safetensors was not loaded ({text.classes_not_loaded})"
        raise SystemExit(
            f"{has if text.classes_not_loaded else f'{model} has no latent_classes.safetensors'}: give "
            "--labelled_file and --label_file to fit the classes (and --save_classes to keep them with the model)."
        )
    elif str(label).strip() not in text.classes.labels:
        raise SystemExit(
            f"--label {label!r} is not among the model's saved classes ({', '.join(text.classes.labels)})."
        )
    decoding = dict(EDIT_DECODING)
    if max_new_tokens is not None:
        decoding["max_new_tokens"] = max_new_tokens
    generator = torch.Generator().manual_seed(seed)
    outputs = text.sample(sample, generator=generator, label=label, **decoding)
    for line in outputs:
        print(line, file=file)
    return outputs
