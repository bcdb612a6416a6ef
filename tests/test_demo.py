"""`scalevae demo`'s handlers without a browser (tests/test_demo_browser.py drives the page itself): every input's
bounds, the folders it refuses before a server starts, answers that match `LatentText`'s, concurrent requests that
each get their single-user answer, the command without Gradio, and the Space files `save_model(space=True)` writes.
The model: tests/demo_model.py's tiny Scale-VAE trained for seconds on short Yelp reviews, with sentiment classes."""

import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from scalevae import LatentText
from scalevae import demo as demo_module
from scalevae.demo import (
    DEFAULT_FOLDER,
    EMBEDDED_SENTENCES,
    GREEDY,
    INSTALL_HINT,
    LABELS_FILE,
    SENTENCES_FILE,
    DemoInputError,
    DemoSetupError,
    LatentDemo,
    Limits,
    _number,
    class_direction,
    class_log_probs,
    fit_projection,
    parse_args,
    serve,
)
from scalevae.latent import CLASSES_FILE
from scalevae.options import OptionError
from tests.data_guard import shared_file
from tests.demo_model import build_demo_folder, short_reviews
from tests.model_tester import one_thread

LIMITS = Limits()


@pytest.fixture(scope="module")
def yelp():
    return shared_file("yelp_sentiment.train.txt"), shared_file("yelp_sentiment.train.label")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, yelp):
    return build_demo_folder(tmp_path_factory.mktemp("demo") / "model", *yelp)


@pytest.fixture(scope="module")
def demo(folder, yelp):
    with one_thread():
        return LatentDemo.load(folder, *yelp, max_sentences=200)


@pytest.fixture(scope="module")
def reviews(yelp):
    return short_reviews(*yelp)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def decoding(**settings):
    return dict(GREEDY, max_new_tokens=LIMITS.max_new_tokens, **settings)


# -- answers: the same as LatentText's --------------------------------------------------------------------------------


def test_reconstruct_and_interpolate_give_latent_texts_answers(demo, folder, reviews):
    text = LatentText.from_pretrained(folder)
    a, b = reviews[0][:2]
    result = demo.reconstruct(a)
    assert result["text"] == text.reconstruct([a], **decoding())[0] == a  # the tiny model learned its reviews
    assert result["norm"] == pytest.approx(float(text.encode([a]).norm()), rel=1e-5)
    assert result["neighbours"][0] == (a, pytest.approx(0.0, abs=1e-4))  # the review is on the map: its own neighbour
    distances = [d for _, d in result["neighbours"]]
    assert distances == sorted(distances) and len(distances) == 5
    path = demo.interpolate(a, b, 7)
    assert path["texts"] == text.interpolate(a, b, steps=7, **decoding())
    assert len(path["xy"]) == 7 and path["xy"][0] != path["xy"][-1]


def test_edit_moves_along_the_saved_classes_and_reports_their_log_probabilities(demo, folder, reviews):
    text = LatentText.from_pretrained(folder)
    texts, labels = reviews
    sentence = next(t for t, y in zip(texts, labels) if y == "0")
    result = demo.edit(sentence, "1", 2.0)
    direction = class_direction(text.classes, "0", "1")
    assert result["source"] == "0"
    assert result["text"] == text.edit([sentence], direction, 2.0, **decoding())[0]
    before, after = (torch.tensor([result["log_probs"][c][k] for c in ("0", "1")]) for k in (0, 1))
    assert torch.allclose(before.exp().sum(), torch.tensor(1.0, dtype=before.dtype))
    assert after[1] > before[1]  # moving towards class 1 raises its log-probability
    # the direction from the saved statistics is the one fitted from the texts' class means (same Gaussians)
    fitted = text.attribute_direction(texts, labels, target="1", source="0")
    assert torch.allclose(direction.vector, fitted.vector, atol=1e-4)
    assert direction.spread == pytest.approx(fitted.spread, rel=1e-4)


def test_class_log_probs_is_bayes_rule_over_the_class_gaussians(demo):
    classes = demo.classes
    z = classes.means[:1].clone()
    log_probs = class_log_probs(classes, z)[0]
    densities = [
        torch.distributions.MultivariateNormal(classes.means[i], classes.covariances[i]).log_prob(z[0])
        + (classes.counts[i] / classes.counts.sum()).log()
        for i in range(len(classes.labels))
    ]
    assert torch.allclose(log_probs, torch.stack(densities) - torch.stack(densities).logsumexp(0))


def test_samples_are_seeded_bounded_and_mark_duplicates(demo, folder, reviews):
    first = demo.sample(8, 1.0, 0.9, seed=3)
    text = LatentText.from_pretrained(folder)
    torch.manual_seed(3)
    alone = text.sample(8, generator=torch.Generator().manual_seed(3), **decoding(do_sample=True, top_p=0.9))
    assert first["texts"] == alone
    assert first == demo.sample(8, 1.0, 0.9, seed=3)
    assert first["texts"] != demo.sample(8, 1.0, 0.9, seed=4)["texts"]
    for i, mark in enumerate(first["duplicate_of"]):
        earlier = [j + 1 for j, t in enumerate(first["texts"][:i]) if t.split() == first["texts"][i].split()]
        assert mark == (earlier[0] if earlier else None)
    # radius 0 around a sentence: every latent is the sentence's; greedy-like decoding (tiny temperature) repeats it
    around = demo.sample(4, LIMITS.min_temperature, 1.0, seed=0, around=reviews[0][0], radius=0.0)
    assert around["texts"] == [reviews[0][0]] * 4 and around["duplicate_of"] == [None, 1, 1, 1]


def test_the_map_holds_the_sentences_their_labels_and_the_typed_ones(demo, reviews):
    result = demo.map_points("the food was cold .\n\n" + reviews[0][0])
    assert len(result["xy"]) == len(result["texts"]) == len(result["labels"]) == 200
    assert set(result["labels"]) == {"0", "1"}
    assert result["typed"] == ["the food was cold .", reviews[0][0]]
    assert len(result["typed_xy"]) == 2
    on_map = demo.sentences.index(reviews[0][0])  # the first review is on the map too
    assert result["typed_xy"][1] == pytest.approx(result["xy"][on_map], abs=1e-4)


def test_the_map_is_the_pca_of_the_latents_unless_umap_is_installed(demo, monkeypatch):
    assert demo.projection == "PCA"  # umap-learn is not a dependency
    centred = demo.latents - demo.latents.mean(0)
    xy = demo.map_xy
    assert xy.var(0)[0] >= xy.var(0)[1] > 0
    # the two axes hold as much of the spread as any two orthogonal directions can: the top singular values
    assert (xy.pow(2).sum()).item() == pytest.approx(torch.linalg.svdvals(centred)[:2].pow(2).sum().item(), rel=1e-6)
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(DemoSetupError, match="--projection umap needs the umap-learn package"):
        fit_projection(demo.latents, "umap")
    assert fit_projection(demo.latents, "auto")[0] == "PCA"

    class FakeUMAP:  # what the page asks of umap-learn: fit, then transform
        def __init__(self, n_components, random_state):
            assert (n_components, random_state) == (2, 0)

        def fit(self, features):
            self.offset = features.mean(0)[:2]
            return self

        def transform(self, features):
            return features[:, :2] - self.offset

    monkeypatch.setitem(sys.modules, "umap", type(sys)("umap"))
    sys.modules["umap"].UMAP = FakeUMAP
    name, place = fit_projection(demo.latents, "auto")
    assert name == "UMAP"
    assert torch.allclose(place(demo.latents[:3]), demo.latents[:3, :2] - demo.latents[:, :2].mean(0))
    with pytest.raises(DemoSetupError, match="--projection 'tsne' is not one of"):
        fit_projection(demo.latents, "tsne")


def test_the_map_sentences_come_from_the_files_given_else_the_folder_else_the_embedded_corpus(folder, yelp, tmp_path):
    embedded = LatentDemo.load(folder, max_sentences=50)
    assert embedded.source == str(EMBEDDED_SENTENCES) and embedded.labels is None
    lines = [line for line in EMBEDDED_SENTENCES.read_text().splitlines() if line.strip()]
    assert embedded.sentences[0] == lines[0].strip() and embedded.sentences[-1] == lines[-1].strip()  # evenly spread
    assert set(embedded.map_points()["labels"]) == {"sentence"}
    own = tmp_path / "own"
    shutil.copytree(folder, own)
    (own / SENTENCES_FILE).write_text("the soup was cold .\n\nthe staff was kind .\n")
    (own / LABELS_FILE).write_text("0\n\n1\n")
    carried = LatentDemo.load(own)
    assert (carried.sentences, carried.labels) == (["the soup was cold .", "the staff was kind ."], ["0", "1"])
    given = LatentDemo.load(own, *yelp, max_sentences=30)  # the files given win over the folder's
    assert len(given.sentences) == 30 and given.source == str(yelp[0])


def test_concurrent_requests_each_get_their_single_user_answer(demo, reviews):
    a, b, c = reviews[0][:3]
    calls = [lambda seed=seed: demo.sample(6, 1.2, 0.95, seed=seed)["texts"] for seed in range(6)] + [
        lambda: demo.interpolate(a, b, 6)["texts"],
        lambda: demo.edit(c, "1", 1.5)["text"],
    ]
    alone = [call() for call in calls]
    answers = [[] for _ in calls]

    def client(k):
        for i in range(len(calls)):
            j = (i + k) % len(calls)
            answers[j].append(calls[j]())

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for single, many in zip(alone, answers):
        assert len(many) == 8 and all(answer == single for answer in many)


# -- bounds -------------------------------------------------------------------------------------------------------------

LONG = "a" * (LIMITS.max_chars + 1)
# (handler, arguments, the message's start): every input, past each of its bounds and of the wrong kind
OUT_OF_BOUNDS = [
    ("reconstruct", ("",), "sentence is empty"),
    ("reconstruct", ("   ",), "sentence is empty"),
    ("reconstruct", (None,), "sentence is empty"),
    ("reconstruct", (LONG,), f"sentence has {len(LONG)} characters: at most {LIMITS.max_chars}"),
    ("interpolate", ("a b", LONG, 5), "sentence B has"),
    ("interpolate", ("", "a b", 5), "sentence A is empty"),
    ("interpolate", ("a b", "c d", 1), "steps must be a whole number in [2, 12], got 1"),
    ("interpolate", ("a b", "c d", 13), "steps must be a whole number in [2, 12], got 13"),
    ("interpolate", ("a b", "c d", 2.5), "steps must be a whole number"),
    ("interpolate", ("a b", "c d", float("nan")), "steps must be a whole number"),
    ("interpolate", ("a b", "c d", "many"), "steps must be a whole number"),
    ("interpolate", ("a b", "c d", True), "steps must be a whole number"),
    ("sample", (0, 1.0, 0.9, 0), "samples must be a whole number in [1, 16], got 0"),
    ("sample", (17, 1.0, 0.9, 0), "samples must be a whole number in [1, 16], got 17"),
    ("sample", (2, 0.0, 0.9, 0), "temperature must be a number in [0.05, 2], got 0"),
    ("sample", (2, 2.5, 0.9, 0), "temperature must be a number in [0.05, 2]"),
    ("sample", (2, float("inf"), 0.9, 0), "temperature must be a number"),
    ("sample", (2, 1.0, 0.0, 0), "top-p must be a number in [0.05, 1], got 0"),
    ("sample", (2, 1.0, 1.5, 0), "top-p must be a number in [0.05, 1]"),
    ("sample", (2, 1.0, 0.9, -1), "seed must be a whole number in [0, 2.14748e+09], got -1"),
    ("sample", (2, 1.0, 0.9, 2**31), "seed must be a whole number"),
    ("sample", (2, 1.0, 0.9, 0, LONG, 0.5), "sample around has"),
    ("sample", (2, 1.0, 0.9, 0, "a b", -0.1), "radius must be a number in [0, 4], got -0.1"),
    ("sample", (2, 1.0, 0.9, 0, "a b", 4.5), "radius must be a number in [0, 4]"),
    ("edit", ("", "1", 1.0), "sentence is empty"),
    ("edit", (LONG, "1", 1.0), "sentence has"),
    ("edit", ("a b", "2", 1.0), "target class '2' is not one of ['0', '1']"),
    ("edit", ("a b", "1", 4.5), "strength must be a number in [-4, 4], got 4.5"),
    ("edit", ("a b", "1", -4.5), "strength must be a number in [-4, 4]"),
    ("edit", ("a b", "1", float("nan")), "strength must be a number"),
    ("map_points", ("\n".join(["a b"] * (LIMITS.max_typed + 1)),), "9 sentences typed: at most 8"),
    ("map_points", ("a b\n" + LONG,), "typed sentence 2 has"),
]


@pytest.mark.parametrize("handler, arguments, message", OUT_OF_BOUNDS)
def test_every_input_out_of_bounds_is_refused_naming_it(demo, handler, arguments, message):
    with pytest.raises(DemoInputError) as refused:
        getattr(demo, handler)(*arguments)
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.parametrize("low, high, whole", [(2, 12, True), (1, 16, True), (0.05, 2.0, False), (-4.0, 4.0, False)])
def test_a_number_is_accepted_exactly_within_its_bounds(low, high, whole):
    """The one rule every numeric input goes through, swept: inside [low, high] (and whole when asked) it comes back as
    a number of the right type; anything else is refused with a message naming the input and its range."""
    span = high - low
    inside = [low, high, (low + high) // 2 if whole else low + span / 2, str(high), float(low)]
    outside = [low - 1e-9, high + 1e-9, low - span, high + span, float("nan"), float("inf"), -float("inf"), "x", "",
               None, True, [low], -(10**30)]  # fmt: skip
    if whole:
        outside += [low + 0.5, str(low + 0.5)]
    for value in inside:
        number = _number(value, "the input", low, high, whole)
        assert low <= number <= high and isinstance(number, int if whole else float), value
    for value in outside:
        with pytest.raises(DemoInputError, match=rf"^the input must be a (whole )?number in \[{low:g}, {high:g}\]"):
            _number(value, "the input", low, high, whole)


def test_the_bounds_themselves_are_accepted(demo):
    demo.reconstruct("a" * LIMITS.max_chars)
    assert len(demo.interpolate("good food .", "bad food .", LIMITS.max_steps)["texts"]) == LIMITS.max_steps
    assert len(demo.interpolate("good food .", "bad food .", "2")["texts"]) == 2  # a number typed as text
    assert len(demo.sample(LIMITS.max_samples, LIMITS.max_temperature, LIMITS.min_top_p, 0)["texts"]) == 16
    demo.sample(1, LIMITS.min_temperature, 1.0, LIMITS.max_seed, around="good food .", radius=LIMITS.max_radius)
    demo.edit("good food .", "0", -LIMITS.max_strength)
    demo.map_points("\n".join(["good food ."] * LIMITS.max_typed))


def test_a_sentence_longer_than_the_decoder_reads_is_truncated_not_refused(demo):
    # 300 characters tokenize to more than the encoder's max_length: the encoder truncates, as LatentText does
    assert isinstance(demo.reconstruct(" ".join(["good"] * 60))["text"], str)


def test_edit_without_class_statistics_says_so(folder, yelp, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / CLASSES_FILE).unlink()
    demo = LatentDemo.load(bare, *yelp, max_sentences=20)
    with pytest.raises(DemoInputError, match=f"this folder has no {CLASSES_FILE}"):
        demo.edit("good food .", "1", 1.0)


# -- folders and files refused before the server starts ----------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if a server would start; record the launch arguments otherwise."""
    gradio = pytest.importorskip("gradio")
    launched = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.append(kwargs))
    return launched


def refusal(argv, no_launch) -> str:
    with pytest.raises(SystemExit) as stopped:
        serve(parse_args(argv))
    assert no_launch == [], "the server started"
    return str(stopped.value)


def test_the_default_folder_when_missing_says_how_to_make_it(no_launch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_args([]).folder == str(DEFAULT_FOLDER)
    message = refusal([], no_launch)
    assert str(DEFAULT_FOLDER) in message and "scalevae quickstart" in message


def test_folders_it_cannot_load_are_refused_naming_the_problem(folder, yelp, tmp_path, no_launch):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "config.json").unlink()
    assert "lacks config.json" in refusal([str(broken)], no_launch)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # damaged weights: the checksum catches them
    assert f"cannot load the model in {corrupt}" in refusal([str(corrupt)], no_launch)
    assert "is not a folder" in refusal([str(tmp_path / "nowhere")], no_launch)
    sentences, labels = (str(path) for path in yelp)
    assert "No such file" in refusal([str(folder), "--sentences", str(tmp_path / "none.txt")], no_launch)
    short = tmp_path / "short.label"
    short.write_text("0\n1\n")
    message = refusal([str(folder), "--sentences", sentences, "--labels", str(short)], no_launch)
    assert "one label per sentence" in message
    assert "--labels goes with --sentences" in refusal([str(folder), "--labels", labels], no_launch)
    for option, value, message in (
        ("--max_sentences", "1", "demo: --max_sentences 1: must be a whole number in [2, 5000]."),
        ("--max_queue", "0", "demo: --max_queue 0: must be a whole number in [1, 1000]."),
        ("--port", "70000", "demo: --port 70000: must be a whole number in [1, 65535]."),
    ):
        with pytest.raises(OptionError) as refused:
            parse_args([str(folder), option, value])
        assert str(refused.value) == message
    with pytest.raises(DemoSetupError, match=r"--max_sentences 1 must be in \[2, 5000\]"):
        LatentDemo.load(folder, max_sentences=1)  # the Python API checks it too
    assert "--device 'gpu0' is not a device name" in refusal([str(folder), "--device", "gpu0"], no_launch)


def test_the_server_binds_loopback_unless_told_and_bounds_its_queue(folder, yelp, no_launch):
    args = parse_args([str(folder), "--sentences", str(yelp[0]), "--max_sentences", "20", "--max_queue", "7"])
    assert args.host == "127.0.0.1"
    page = serve(args, host=args.host)
    assert no_launch[0]["server_name"] == "127.0.0.1" and no_launch[0]["share"] is False
    assert page._queue.max_size == 7


def test_without_gradio_the_command_says_how_to_install_it(monkeypatch, folder):
    from scalevae.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(SystemExit) as stopped:
        main(["demo", str(folder)])
    assert str(stopped.value) == INSTALL_HINT


def test_a_folder_saved_as_a_space_carries_its_app(folder, tmp_path):
    from scalevae.hub import save_model

    text = LatentText.from_pretrained(folder)
    space = save_model(tmp_path / "space", text.model, text.encoder_tokenizer, text.decoder_tokenizer, space=True)
    assert (space / "app.py").read_text().count("serve(") == 1
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("gradio") for r in requirements) and any(r.startswith("torch") for r in requirements)
    assert (space / "scalevae" / "demo.py").read_text() == Path(demo_module.__file__).read_text()
    card = (space / "README.md").read_text()
    assert card.startswith("---\nsdk: gradio\napp_file: app.py\n") and "scalevae demo" in card
    plain = save_model(tmp_path / "plain", text.model, text.encoder_tokenizer, text.decoder_tokenizer)
    assert not (plain / "app.py").exists() and not (plain / "scalevae").exists()
