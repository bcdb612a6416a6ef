"""Steering text through the latent (`LatentText`'s attribute directions, edits, class Gaussians, analogies and
traversals; `scalevae.control`'s measurement and command-line jobs) on a tiny Scale-VAE trained for a few seconds on a
corpus whose class is one known word: "the food was good downtown ..." against "the food was bad downtown ...".

The model learns the corpus exactly (600 steps; every reconstruction is its source), so what an edit keeps and what
it changes can be checked word by word. Training runs on one thread: steps this small spend more time waking a second
thread than computing, ten times more on a loaded machine.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from scalevae import LatentText
from scalevae.control import (
    TextClassifier,
    control_curve,
    edit_command,
    evaluate_control,
    format_examples,
    generate_label,
    transfer_at_bleu,
)
from scalevae.factory import fit_decoder_tokenizer, prepare_decoder_tokenizer
from scalevae.hub import folder_files, save_model
from scalevae.latent import CLASSES_FILE, AttributeDirection
from scalevae.metrics import metric_info
from scalevae.plots import plot_control
from tests.model_tester import ScaleVAEModelTester, one_thread, train_on_one_batch

NOUNS = ("food", "service", "staff", "pizza", "coffee", "room")
PLACES = ("downtown", "uptown", "tonight", "today")
TEMPLATE = "the {noun} was {word} {place} and we will come back ."
WORDS = {"negative": "bad", "positive": "good"}  # label -> the word that carries it
# Every seed tried (0-3) learned the corpus exactly by step 500 at a learning rate of 3e-3 (none by 300; 6e-3 diverged
# on two); 600 leaves a margin. A latent of 8 at des_std 1 has no room: the decoder's σ-noise is as large as the signal.
STEPS, LATENT_SIZE, DES_STD = 600, 8, 3.0


def corpus() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for noun, place in itertools.product(NOUNS, PLACES):
        for label, word in WORDS.items():
            texts.append(TEMPLATE.format(noun=noun, word=word, place=place))
            labels.append(label)
    return texts, labels


def flipped(text: str) -> str:
    """The sentence with its class word swapped."""
    return " ".join({"good": "bad", "bad": "good"}.get(word, word) for word in text.split())


def word_class(text: str) -> str | None:
    words = set(text.split())
    found = [label for label, word in WORDS.items() if word in words]
    return found[0] if len(found) == 1 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The model trained on the corpus (one batch of all 48 sentences, AdamW), its `LatentText` and its saved folder.
    One byte-level BPE of the corpus serves both sides: a 30k-row encoder embedding would cost most of the time."""
    texts, _ = corpus()
    tokenizer = prepare_decoder_tokenizer(fit_decoder_tokenizer(texts, vocab_size=300))
    tester = ScaleVAEModelTester(latent_size=LATENT_SIZE, dropout=0.0, decoder_layers=1)
    # The steps above were calibrated with both injection paths; the memory slot alone (the default) needs more of
    # them on this one-layer decoder. The editing machinery under test is the same either way.
    model = tester.get_model_for_tokenizers(
        tokenizer, tokenizer, collapse_strategy="scale", scale_target_std=DES_STD, latent_injection="both"
    )
    train_on_one_batch(model, tokenizer, texts, STEPS, max_length=24)
    folder = save_model(tmp_path_factory.mktemp("synthetic") / "model", model, tokenizer, tokenizer)
    return LatentText(model, tokenizer, tokenizer, max_length=24), folder


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_the_model_learned_the_corpus(trained):
    text, _ = trained
    texts, _ = corpus()
    assert text.reconstruct(texts, do_sample=False) == texts


@pytest.mark.parametrize("method", ["mean", "logistic"])
def test_editing_along_the_fitted_direction_flips_the_word_and_keeps_the_rest(trained, method):
    text, _ = trained
    texts, labels = corpus()
    direction = text.attribute_direction(texts, labels, method=method)
    assert (direction.source, direction.target, direction.method) == ("negative", "positive", method)
    assert torch.linalg.vector_norm(direction.vector).item() == pytest.approx(1.0)
    assert direction.spread > 0 and direction.separation > 1
    negative = [t for t, y in zip(texts, labels) if y == "negative"]
    positive = [t for t, y in zip(texts, labels) if y == "positive"]
    # the unit: strength 1 carries the source class's mean latent onto the target's, along the direction
    means = [text.encode(side).mean(0, keepdim=True) for side in (negative, positive)]
    moved = text.edit_latents(means[0], direction, 1.0)
    assert (moved @ direction.vector).item() == pytest.approx((means[1] @ direction.vector).item(), rel=1e-4)
    edits = text.edit(negative, direction, 1.0, do_sample=False)
    assert sum(e == flipped(t) for e, t in zip(edits, negative)) >= 0.9 * len(negative), list(zip(negative, edits))
    back = text.edit(positive, direction, -1.0, do_sample=False)
    assert sum(e == flipped(t) for e, t in zip(back, positive)) >= 0.9 * len(positive)
    # one strength per text, in one batch: each sentence moved towards the class it does not have
    signs = [direction.sign_towards("positive") if y == "negative" else -1.0 for y in labels]
    both = text.edit(texts, direction, signs, batch_size=7, do_sample=False)
    assert sum(e == flipped(t) for e, t in zip(both, texts)) >= 0.9 * len(texts)
    # strength 0 is the reconstruction
    assert text.edit(negative, direction, 0.0, do_sample=False) == negative


def test_a_model_left_in_training_mode_is_measured_as_in_eval_mode_and_left_so(trained):
    """A Trainer leaves the model in training mode: Scale-VAE would then scale each batch by its own spread and move
    its saved factors. Fitting and editing run in eval mode and give the model back in the mode it was in."""
    text, _ = trained
    texts, labels = corpus()
    factors = text.model.collapse.scale_factors.clone()
    expected = text.attribute_direction(texts, labels)
    text.model.train()
    try:
        direction = text.attribute_direction(texts[:10], labels[:10])
        direction = text.attribute_direction(texts, labels)
        classes = text.fit_classes(texts, labels)
        towards_other = [1.0 if y == "negative" else -1.0 for y in labels[:4]]
        edits = text.edit(texts[:4], direction, towards_other, batch_size=3, do_sample=False)
        assert text.model.training
    finally:
        text.model.eval()
    assert torch.equal(direction.vector, expected.vector) and direction.spread == expected.spread
    assert torch.equal(classes.means, text.fit_classes(texts, labels).means)
    assert edits == [flipped(t) for t in texts[:4]]
    assert torch.equal(text.model.collapse.scale_factors, factors)


def test_a_direction_between_two_lists_is_the_labelled_one(trained):
    text, _ = trained
    texts, labels = corpus()
    negative = [t for t, y in zip(texts, labels) if y == "negative"]
    positive = [t for t, y in zip(texts, labels) if y == "positive"]
    between = text.direction_between(negative, positive)
    labelled = text.attribute_direction(texts, labels)
    assert (between.source, between.target) == ("source", "target")
    assert torch.allclose(between.vector, labelled.vector, atol=1e-6)
    assert between.spread == pytest.approx(labelled.spread, rel=1e-6)
    # more than two classes: the two named, the rest ignored
    three = text.attribute_direction(
        texts + ["the pizza was so so today ."], labels + ["neutral"], "positive", "negative"
    )
    assert torch.allclose(three.vector, labelled.vector, atol=1e-6)


def test_conditional_samples_are_classified_as_their_class(trained):
    text, _ = trained
    texts, labels = corpus()
    classes = text.fit_classes(texts, labels)
    assert classes.labels == ("negative", "positive") and classes.counts.tolist() == [24, 24]
    assert classes.covariances.shape == (2, LATENT_SIZE, LATENT_SIZE)
    assert torch.equal(classes.covariances[0], classes.covariances[0].T)
    classifier = TextClassifier.fit(texts, labels)
    for label in ("negative", "positive"):
        samples = text.sample(40, generator=torch.Generator().manual_seed(1), label=label, do_sample=False)
        assert len(samples) == 40 and len(set(samples)) > 5  # the class's spread, not one sentence
        assert classifier.accuracy(samples, [label] * 40) > 0.75, samples
        assert sum(word_class(s) == label for s in samples) > 0.75 * 40
    diagonal = text.fit_classes(texts, labels, covariance="diagonal")
    assert torch.equal(diagonal.covariances[1], torch.diag(torch.diagonal(diagonal.covariances[1])))


def test_saved_class_statistics_load_bit_exact_and_sample_the_same(trained, tmp_path):
    import shutil

    text, folder = trained
    texts, labels = corpus()
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    fitted = text.fit_classes(texts, labels)
    assert text.save_classes(copy) == copy / CLASSES_FILE
    assert CLASSES_FILE in folder_files(copy)  # push_to_hub uploads it with the model
    loaded = LatentText.from_pretrained(copy)
    assert loaded.classes.labels == fitted.labels and loaded.classes.covariance == fitted.covariance
    for name in ("means", "covariances", "counts"):
        assert torch.equal(getattr(loaded.classes, name), getattr(fitted, name)), name
    seeded = dict(generator=torch.Generator().manual_seed(3), label="positive", do_sample=False)
    assert loaded.sample(6, **seeded) == text.sample(6, **{**seeded, "generator": torch.Generator().manual_seed(3)})
    assert LatentText.from_pretrained(folder).classes is None  # a folder without the file


def test_class_statistics_of_other_weights_are_not_loaded(trained, tmp_path, caplog):
    text, folder = trained
    texts, labels = corpus()
    text.fit_classes(texts, labels)
    text.save_classes(folder)
    try:
        other = ScaleVAEModelTester(latent_size=LATENT_SIZE).get_model_for_tokenizers(
            text.encoder_tokenizer, text.decoder_tokenizer, seed=1
        )
        other_folder = save_model(tmp_path / "other", other, text.encoder_tokenizer, text.decoder_tokenizer)
        (other_folder / CLASSES_FILE).write_bytes((folder / CLASSES_FILE).read_bytes())
        with caplog.at_level("WARNING"):
            assert LatentText.from_pretrained(other_folder).classes is None
        assert "fitted on other weights" in caplog.text
    finally:
        (folder / CLASSES_FILE).unlink()


def test_analogy_is_batched_and_traversal_sets_one_coordinate(trained):
    text, _ = trained
    a = ["the food was bad downtown and we will come back .", "the room was bad today and we will come back ."]
    b = ["the food was good downtown and we will come back .", "the room was good today and we will come back ."]
    c = ["the pizza was bad uptown and we will come back .", "the staff was bad tonight and we will come back ."]
    batched = text.analogy(a, b, c, do_sample=False)
    assert isinstance(batched, list) and len(batched) == 2
    assert text.analogy(a[1], b[1], c[1], do_sample=False) == batched[1]  # one analogy: one string, the same
    assert sum(out == flipped(x) for out, x in zip(batched, c)) >= 1, batched
    sentence = c[0]
    z = text.encode([sentence])[0]
    # the coordinate the corpus's latents vary most along: one a decoder that uses z must read
    spread = text.encode(corpus()[0]).std(0)
    dim = int(spread.argmax())
    assert text.traverse(sentence, dim, [z[dim].item()], do_sample=False) == [sentence]
    walk = text.traverse(z, dim, [(z[dim] + k * spread[dim]).item() for k in (-3, 0, 3)], do_sample=False)
    assert len(walk) == 3 and walk[1] == sentence and len(set(walk)) > 1, walk


def test_evaluate_control_measures_transfer_content_and_fluency(trained, tmp_path):
    text, _ = trained
    texts, labels = corpus()
    classifier = TextClassifier.fit(texts, labels)
    seen = []

    def fluency(edits):
        seen.append(list(edits))
        return 10.0 + len(seen)

    results = evaluate_control(
        text, texts, labels, classifier, strengths=(1.0, 0.0, 0.25), fluency=fluency, train_texts=texts,
        train_labels=labels, num_sentences=40,
    )  # fmt: skip
    assert results["control_acc@0.0"] <= 0.05 and results["control_bleu@0.0"] > 99  # reconstructions
    assert results["control_acc@1.0"] >= 0.9
    assert 30 < results["control_bleu@1.0"] < 90  # one word of twelve changed
    assert results["control_strength50"] in (0.25, 1.0)
    at = results["control_strength50"]
    assert results["control_acc50"] == results[f"control_acc@{at}"] >= 0.5
    assert results["control_bleu50"] == results[f"control_bleu@{at}"]
    assert results["control_ppl50"] == results[f"control_ppl@{at}"]
    assert results["control_repetition@1.0"] == 0.0 and results["control_repetition50"] == 0.0  # one word swapped
    assert [len(edits) for edits in seen] == [40, 40, 40] and results["control_ppl@0.0"] == 11.0  # increasing strength
    assert seen[0] == texts[:40]
    figures = [key for key in results if key != "control_examples"]
    assert all(metric_info(key).description != "as reported by the evaluation" for key in figures), results
    # the first five test sentences and their edits at each strength, as measured: source, edit, the class it went to
    targets = ["positive" if y == "negative" else "negative" for y in labels[:5]]
    examples = results["control_examples"]
    assert [(source, target) for source, _, target in examples["1"]] == list(zip(texts[:5], targets))
    assert examples["1"][0][1] == flipped(texts[0]) and [edit for _, edit, _ in examples["0"]] == texts[:5]
    assert control_curve(results) == ([0.0, 0.25, 1.0], [results[f"control_acc@{s}"] for s in (0.0, 0.25, 1.0)])
    png = plot_control([results, results], tmp_path / "control.png", title="Scale-VAE")
    assert png.stat().st_size > 10_000
    # the direction comes from the training sentences, never the test ones: training labels swapped, edits go astray
    swapped = {"negative": "positive", "positive": "negative"}
    astray = evaluate_control(
        text, texts, labels, classifier, strengths=(1.0,), train_texts=texts,
        train_labels=[swapped[y] for y in labels], num_sentences=40,
    )  # fmt: skip
    assert astray["control_acc@1.0"] <= 0.1
    # no strength reaches 50%: the summary says so, with NaN
    none = evaluate_control(
        text, texts, labels, classifier, strengths=(0.0,), direction=text.attribute_direction(texts, labels)
    )
    assert math.isnan(none["control_strength50"]) and math.isnan(none["control_acc50"]) and "control_ppl50" not in none


def test_transfer_at_equal_bleu_is_interpolated_where_the_curve_falls_through_it():
    def curve(points):
        results = {}
        for strength, bleu, accuracy in points:
            results[f"control_bleu@{strength}"], results[f"control_acc@{strength}"] = bleu, accuracy
        return results

    falls = curve([(0.0, 4.0, 0.1), (1.0, 2.0, 0.5), (2.0, 0.0, 0.9)])
    assert transfer_at_bleu(falls, 1.0) == pytest.approx(0.7)  # halfway from BLEU 2 to 0
    assert transfer_at_bleu(falls, 2.0) == pytest.approx(0.5) and transfer_at_bleu(falls, 4.0) == pytest.approx(0.1)
    assert math.isnan(transfer_at_bleu(falls, 5.0))  # the reconstructions keep less than that
    assert math.isnan(transfer_at_bleu(curve([(0.0, 4.0, 0.1), (1.0, 3.0, 0.5)]), 1.0))  # never falls that low
    assert math.isnan(transfer_at_bleu({}, 1.0))


def test_the_measured_examples_print_as_source_and_edit(trained):
    text, _ = trained
    texts, labels = corpus()
    results = evaluate_control(
        text, texts, labels, TextClassifier.fit(texts, labels), strengths=(1.0,),
        direction=text.attribute_direction(texts, labels), num_sentences=3, num_examples=2,
    )  # fmt: skip
    lines = format_examples(results["control_examples"]["1"]).splitlines()
    assert len(lines) == 2 and lines[0] == f"[to positive] {texts[0]} -> {flipped(texts[0])}"


def test_classifier_saves_without_pickle_and_loads_the_same(trained, tmp_path):
    texts, labels = corpus()
    classifier = TextClassifier.fit(texts, labels)
    classifier.test_accuracy = 0.75
    path = classifier.save(tmp_path / "classifier.npz")
    loaded = TextClassifier.load(path)
    probe = ["the food was good", "bad bad service", "we will come back", "a new sentence entirely"]
    assert np.array_equal(loaded.pipeline.predict_proba(probe), classifier.pipeline.predict_proba(probe))
    assert loaded.labels == ("negative", "positive") and loaded.test_accuracy == 0.75
    assert loaded.accuracy(texts, labels) == 1.0
    np.load(path, allow_pickle=False).close()


def _refusal(text, texts, labels, case):
    direction = text.attribute_direction(texts, labels) if case.startswith(("edit", "evaluate")) else None
    calls = {
        "empty texts": lambda: text.attribute_direction([], []),
        "one string": lambda: text.edit(texts[0], direction, 1.0),
        "count mismatch": lambda: text.attribute_direction(texts, labels[:-1]),
        "one class": lambda: text.attribute_direction(texts[:2], ["positive", "positive"]),
        "unknown target": lambda: text.attribute_direction(texts, labels, target="neutral"),
        "edit nan": lambda: text.edit(texts, direction, math.nan),
        "edit inf per text": lambda: text.edit(texts[:2], direction, [1.0, math.inf]),
        "edit per-text count": lambda: text.edit(texts[:2], direction, [1.0, 1.0, 1.0]),
        "edit other latent size": lambda: text.edit(
            texts[:2], AttributeDirection(torch.ones(3) / 3**0.5, 1.0, "a", "b", 1.0), 1.0
        ),
        "unknown label": lambda: text.sample(2, label="neutral"),
        "class of one": lambda: text.fit_classes(texts[:3], ["a", "a", "b"]),
        "traverse dim": lambda: text.traverse(texts[0], LATENT_SIZE, [0.0]),
        "traverse value": lambda: text.traverse(texts[0], 0, [math.nan]),
        "analogy lengths": lambda: text.analogy(texts[:2], texts[:2], texts[:1]),
        "evaluate without training data": lambda: evaluate_control(text, texts, labels, None),
        "evaluate unknown test label": lambda: evaluate_control(text, texts, ["x"] * 48, None, direction=direction),
    }
    return calls[case]


REFUSALS = {
    "empty texts": r"texts is empty",
    "one string": r"texts must be a list of texts, got one string",
    "count mismatch": r"48 texts but 47 labels",
    "one class": r"the labels hold one class \('positive'\)",
    "unknown target": r"target='neutral' is not among the labels",
    "edit nan": r"strength=nan must be a finite number",
    "edit inf per text": r"strength must be finite",
    "edit per-text count": r"strength holds \(3,\) values",
    "edit other latent size": r"the direction has 3 dimensions but the latents 8",
    "unknown label": r"label 'neutral' is unknown: the fitted classes are \['negative', 'positive'\]",
    "class of one": r"class 'b' has 1 text",
    "traverse dim": rf"dim={LATENT_SIZE} must be a whole number in \[0, {LATENT_SIZE - 1}\]",
    "traverse value": r"values\[0\]=nan must be a finite number",
    "analogy lengths": r"hold 2, 2 and 1 texts",
    "evaluate without training data": r"needs the training sentences",
    "evaluate unknown test label": r"test labels \['x'\] are not the direction's classes",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_inputs_are_refused_by_name(trained, case):
    text, _ = trained
    texts, labels = corpus()
    text.fit_classes(texts, labels)
    with pytest.raises(ValueError, match=REFUSALS[case]):
        _refusal(text, texts, labels, case)()


def test_sampling_a_label_without_classes_says_how_to_fit_them(trained):
    text, _ = trained
    bare = LatentText(text.model, text.encoder_tokenizer, text.decoder_tokenizer)
    with pytest.raises(ValueError, match=r"needs per-class Gaussians: fit them with fit_classes"):
        bare.sample(2, label="positive")


@pytest.fixture
def labelled_files(tmp_path):
    texts, labels = corpus()
    (tmp_path / "train.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "train.label").write_text("\n".join(labels) + "\n")
    return str(tmp_path / "train.txt"), str(tmp_path / "train.label")


def test_edit_command_prints_source_and_edit(trained, labelled_files, tmp_path, capsys):
    _, folder = trained
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the coffee was bad uptown and we will come back .\n\n")
    pairs = edit_command(
        str(folder), *labelled_files, to="positive", strength=1.0, input_file=str(inputs), device="cpu"
    )
    flip = "the coffee was good uptown and we will come back ."
    assert pairs == [("the coffee was bad uptown and we will come back .", flip)]
    assert capsys.readouterr().out == f"the coffee was bad uptown and we will come back . -> {flip}\n"
    # without --input: the first labelled texts not already of the class
    pairs = edit_command(str(folder), *labelled_files, to="negative", strength=1.0, num_examples=3, device="cpu")
    assert [s for s, _ in pairs] == [t for t, y in zip(*corpus()) if y == "positive"][:3]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(to="neutral"), r"--to 'neutral' is not among the labels of .*train.label \(negative, positive\)"),
        (dict(strength="nan"), r"--strength nan must be a finite number"),
        (dict(strength="strong"), r"--strength 'strong' is not a number"),
        (dict(input_file="/no/such/file.txt"), r"--input /no/such/file.txt"),
        (dict(label_lines=47), r"train.txt has 48 lines but .*train.label has 47"),
        (dict(label_lines=0), r"--label_file .*train.label holds one class \('positive'\)"),
    ],
    ids=["to", "strength-nan", "strength-word", "input", "label-count", "one-class"],
)
def test_edit_command_refuses_bad_inputs_by_flag(trained, labelled_files, change, message):
    _, folder = trained
    text_file, label_file = labelled_files
    change = dict(change)
    if "label_lines" in change:
        lines = open(label_file).read().splitlines()
        keep = change.pop("label_lines")
        with open(label_file, "w") as handle:
            handle.write("\n".join(lines[:keep] if keep else ["positive"] * len(lines)) + "\n")
    arguments = {**dict(to="positive", strength=1.0, device="cpu"), **change}
    with pytest.raises(SystemExit, match=message):
        edit_command(str(folder), text_file, label_file, **arguments)


def test_generate_label_fits_saves_and_reuses_the_classes(trained, labelled_files, tmp_path, capsys):
    import shutil

    _, folder = trained
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    with pytest.raises(SystemExit, match=r"has no latent_classes.safetensors: give --labelled_file and --label_file"):
        generate_label(str(copy), 4, "positive", device="cpu")
    with pytest.raises(SystemExit, match=r"--label 'neutral' is not among the labels"):
        generate_label(str(copy), 4, "neutral", *labelled_files, device="cpu")
    with pytest.raises(SystemExit, match=r"--sample 0 must be a whole number >= 1"):
        generate_label(str(copy), 0, "positive", *labelled_files, device="cpu")
    with pytest.raises(SystemExit, match=r"--labelled_file and --label_file go together"):
        generate_label(str(copy), 4, "positive", labelled_files[0], device="cpu")
    fitted = generate_label(str(copy), 8, "positive", *labelled_files, save_classes=True, seed=5, device="cpu")
    assert (copy / CLASSES_FILE).is_file()
    assert sum(word_class(s) == "positive" for s in fitted) >= 6
    capsys.readouterr()
    reused = generate_label(str(copy), 8, "positive", seed=5, device="cpu")
    assert reused == fitted and capsys.readouterr().out == "\n".join(fitted) + "\n"
    with pytest.raises(SystemExit, match=r"--label 'neutral' is not among the model's saved classes"):
        generate_label(str(copy), 4, "neutral", device="cpu")


def test_the_cli_edits_and_samples_by_label(trained, labelled_files, tmp_path, capsys):
    """`scalevae edit` and `scalevae generate --sample N --label CLASS` reach the same jobs from the command line."""
    import shutil

    from scalevae.cli import main

    _, folder = trained
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the coffee was bad uptown and we will come back .\n")
    main(["edit", str(copy), "--labelled_file", labelled_files[0], "--label_file", labelled_files[1], "--to",
          "positive", "--strength", "1", "--input", str(inputs), "--device", "cpu"])  # fmt: skip
    assert capsys.readouterr().out.endswith("-> the coffee was good uptown and we will come back .\n")
    main(["generate", str(copy), "--sample", "6", "--label", "negative", "--labelled_file", labelled_files[0],
          "--label_file", labelled_files[1], "--save_classes", "--device", "cpu"])  # fmt: skip
    samples = capsys.readouterr().out.splitlines()
    assert len(samples) == 6 and sum(word_class(s) == "negative" for s in samples) >= 4
    with pytest.raises(SystemExit, match="--label goes with --sample"):
        main(["generate", str(copy), "--reconstruct", "the tea was good", "--label", "negative"])


def test_a_resave_keeps_the_class_statistics_of_the_same_weights_only(trained, labelled_files, tmp_path):
    """save_model replaces the whole folder: the saved classes carry over when the weights are the same, and are left
    out when the weights changed (they would sample latents of another model)."""
    from scalevae import hub, load_pretrained

    _, folder = trained
    copy = tmp_path / "model"
    model, encoder_tokenizer, decoder_tokenizer = load_pretrained(folder)
    hub.save_model(copy, model, encoder_tokenizer, decoder_tokenizer)
    generate_label(str(copy), 2, "positive", *labelled_files, save_classes=True, device="cpu")
    hub.save_model(copy, model, encoder_tokenizer, decoder_tokenizer)
    assert (copy / CLASSES_FILE).is_file()
    with torch.no_grad():
        model.latent_head.proj.bias.add_(0.1)
    hub.save_model(copy, model, encoder_tokenizer, decoder_tokenizer)
    assert not (copy / CLASSES_FILE).exists()
