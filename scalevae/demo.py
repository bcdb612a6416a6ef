"""`scalevae demo FOLDER`: a Gradio page over a trained latent space (Reconstruct, Interpolate, Sample, Edit, Map),
and the files that make a saved folder a Hugging Face Space (`write_space_files`).

Every model call goes through `LatentText`. The page is meant to face many users at once:
- one lock serialises inference, so a request gives exactly the output it gives alone (sampling seeds torch's global
  generator, which concurrent requests would otherwise share), and Gradio's queue in front of it is bounded;
- every input is bounded (`Limits`) and a value out of range is refused with a message naming the input;
- the server binds 127.0.0.1 unless told otherwise and reads nothing but the folder, the sentence files it was given
  and the package's own corpus;
- a folder it cannot load fails before the server starts, naming the problem (`DemoSetupError`).

`LatentDemo` holds the handlers, free of Gradio (the tests call them directly); `build_app` puts them on a page.
"""

import argparse
import math
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .factory import resolve_device
from .latent import CLASSES_FILE, AttributeDirection, LatentClasses, LatentText, evaluating
from .options import OptionParser, device_option, explicit_options, field_specs, number, validate_options

# The embedded main job's folder (`scalevae quickstart` writes it).
DEFAULT_FOLDER = Path("outputs") / "quickstart" / "scale" / "final"
# Sentences a folder may carry for its map (and its Space): one per line, with an optional parallel label file.
SENTENCES_FILE = "demo_sentences.txt"
LABELS_FILE = "demo_sentences.label"
# Without either, the map shows the embedded corpus's training sentences: the main job's own training data.
EMBEDDED_SENTENCES = Path(__file__).resolve().parent / "corpus" / "stdlib.train.txt"
MAX_MAP_SENTENCES = 5000
INSTALL_HINT = (
    "scalevae demo needs Gradio: pip install 'scalevae[demo]' (or, in a checkout, pip install -e '.[demo]')."
)
# Greedy, blocking repeated trigrams, as the quickstart prints text: a looping decoder would otherwise fill the page
# with one word. Sampling adds temperature and top-p to the same settings.
GREEDY = dict(do_sample=False, no_repeat_ngram_size=3)
NEIGHBOURS = 5


class DemoInputError(ValueError):
    """An input of the page out of its bounds; the message names the input and says what is accepted."""


class DemoSetupError(RuntimeError):
    """The folder or a sentence file cannot serve a page; raised before any server starts."""


@dataclass(frozen=True)
class Limits:
    """The bounds of every input of the page (one place: the handlers check them, the widgets show them)."""

    max_chars: int = 300
    min_steps: int = 2
    max_steps: int = 12
    max_samples: int = 16
    max_strength: float = 4.0
    max_radius: float = 4.0
    min_temperature: float = 0.05
    max_temperature: float = 2.0
    min_top_p: float = 0.05
    max_typed: int = 8
    max_new_tokens: int = 40
    max_seed: int = 2**31 - 1


def _number(value, name: str, low: float, high: float, whole: bool = False) -> float | int:
    """`value` as a number in [low, high] (a whole one with `whole`), else `DemoInputError` naming `name`."""
    kind = "a whole number" if whole else "a number"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DemoInputError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DemoInputError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}.")
    if whole and value != int(value):
        raise DemoInputError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}.")
    if not low <= value <= high:
        raise DemoInputError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value:g}.")
    return int(value) if whole else float(value)


def class_direction(classes: LatentClasses, source: str, target: str) -> AttributeDirection:
    """The `AttributeDirection` between two of the folder's class Gaussians: from the source class's mean to the
    target's (the "mean" method of `fit_direction`, from the saved statistics instead of texts); `within_std` pools
    the two classes' variances along it, weighted by their counts."""
    s, t = classes.index(source), classes.index(target)
    gap = classes.means[t] - classes.means[s]
    spread = float(gap.norm())
    if not spread > 0:
        raise DemoInputError(f"classes {source!r} and {target!r} have the same mean latent: nothing separates them.")
    vector = gap / spread
    counts = classes.counts.double()
    variances = torch.stack([vector @ classes.covariances[i] @ vector for i in (s, t)])
    within = float((variances * counts[[s, t]]).sum() / counts[[s, t]].sum())
    return AttributeDirection(vector.float(), spread, classes.labels[s], classes.labels[t], math.sqrt(within))


def class_log_probs(classes: LatentClasses, latents: torch.Tensor) -> torch.Tensor:
    """log p(class | z) for each latent (n, k) under the class Gaussians, with the classes' shares of the fitted texts
    as their prior: the folder's own, classifier-free reading of which class a latent lies in."""
    gaussians = torch.distributions.MultivariateNormal(classes.means, covariance_matrix=classes.covariances)
    log_prior = (classes.counts.double() / classes.counts.sum()).log()
    joint = gaussians.log_prob(latents.double().cpu().unsqueeze(1)) + log_prior
    return joint - joint.logsumexp(-1, keepdim=True)


def read_sentences(
    sentences_file: str | os.PathLike, labels_file: str | os.PathLike | None, max_sentences: int
) -> tuple[list[str], list[str] | None]:
    """Up to `max_sentences` non-blank lines of `sentences_file`, evenly spread over the file, and their labels (the
    same lines of `labels_file`, which must have one line per line of the sentences)."""
    try:
        lines = Path(sentences_file).read_text(encoding="utf-8").splitlines()
        labels = Path(labels_file).read_text(encoding="utf-8").splitlines() if labels_file else None
    except (OSError, UnicodeDecodeError) as error:
        raise DemoSetupError(f"cannot read the map's sentences: {error}") from None
    if labels is not None and len(labels) != len(lines):
        raise DemoSetupError(
            f"{sentences_file} has {len(lines)} lines but {labels_file} has {len(labels)}: one label per sentence."
        )
    kept = [i for i, line in enumerate(lines) if line.strip()]
    if not kept:
        raise DemoSetupError(f"{sentences_file} holds no sentence.")
    if len(kept) > max_sentences:
        kept = [kept[round(j * (len(kept) - 1) / (max_sentences - 1))] for j in range(max_sentences)]
    sentences = [lines[i].strip() for i in kept]
    return sentences, [labels[i].strip() for i in kept] if labels is not None else None


def _duplicates(texts: Sequence[str]) -> list[int | None]:
    """For each text, the 1-based position of its first earlier copy (None: the first of its kind)."""
    first: dict[str, int] = {}
    marks = []
    for i, text in enumerate(texts):
        key = " ".join(text.split()).lower()
        marks.append(first.get(key))
        first.setdefault(key, i + 1)
    return marks


PROJECTIONS = ("auto", "pca", "umap")


def fit_projection(latents: torch.Tensor, method: str = "auto"):
    """(name, project): the map's 2-D projection fitted on `latents` (n, d), and the function that places any latents
    (m, d) on it, as an (m, 2) float64 tensor. `"pca"`: the two directions of largest spread, signs fixed so a rerun
    draws the same map; `"umap"`: UMAP (the optional `umap-learn` package, seeded); `"auto"`: UMAP when installed."""
    if method not in PROJECTIONS:
        raise DemoSetupError(f"--projection {method!r} is not one of {PROJECTIONS}.")
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise DemoSetupError(
                    "--projection umap needs the umap-learn package: pip install umap-learn."
                ) from None
        else:
            reducer = umap.UMAP(n_components=2, random_state=0).fit(latents.double().cpu().numpy())
            guard = threading.Lock()  # UMAP's transform keeps state between calls: one request at a time

            def place(z: torch.Tensor) -> torch.Tensor:
                with guard:
                    return torch.as_tensor(reducer.transform(z.double().cpu().numpy()), dtype=torch.float64)

            return "UMAP", place
    centre = latents.double().cpu().mean(0)
    _, _, vh = torch.linalg.svd(latents.double().cpu() - centre, full_matrices=False)
    axes = vh[:2] * torch.sign(vh[:2].gather(1, vh[:2].abs().argmax(1, keepdim=True)))
    return "PCA", lambda z: (z.double().cpu() - centre) @ axes.T


class LatentDemo:
    """The page's handlers over one `LatentText` and the map's sentences (`sentences`, optional `labels`): each
    checks its inputs against `limits`, holds `lock` while it runs the model, and returns plain Python values."""

    def __init__(
        self,
        text: LatentText,
        sentences: Sequence[str],
        labels: Sequence[str] | None = None,
        limits: Limits = Limits(),
        source: str = "",
        name: str = "",
        projection: str = "auto",
    ):
        self.text, self.limits, self.source, self.name = text, limits, source, name
        self.sentences = list(sentences)
        self.labels = list(labels) if labels is not None else None
        self.lock = threading.Lock()
        self.text.model.eval()
        self.latents = text.encode_in_batches(self.sentences).double().cpu()
        self.projection, self.project = fit_projection(self.latents, projection)
        self.map_xy = self.project(self.latents)
        self.typical_norm = float(self.latents.norm(dim=1).median())

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        sentences_file: str | os.PathLike | None = None,
        labels_file: str | os.PathLike | None = None,
        max_sentences: int = 1000,
        device: str = "cpu",
        projection: str = "auto",
    ) -> "LatentDemo":
        """The demo of a saved folder, or `DemoSetupError` saying why the folder cannot serve one. The map's sentences:
        `sentences_file` (and `labels_file`), else the folder's `demo_sentences.txt` (and `.label`), else the
        embedded corpus's training sentences."""
        from .hub import missing_files

        folder = Path(folder)
        if not folder.is_dir():
            hint = " Make it with `scalevae quickstart`." if folder == DEFAULT_FOLDER else ""
            raise DemoSetupError(f"{folder} is not a folder: give a saved model's folder.{hint}")
        missing = missing_files(folder)
        if missing:
            raise DemoSetupError(f"{folder} is not a complete saved ScaleVAE folder: it lacks {', '.join(missing)}.")
        if not 2 <= max_sentences <= MAX_MAP_SENTENCES:
            raise DemoSetupError(f"--max_sentences {max_sentences} must be in [2, {MAX_MAP_SENTENCES}].")
        if labels_file is not None and sentences_file is None:
            raise DemoSetupError("--labels goes with --sentences (one label per line of that file).")
        if sentences_file is None and (folder / SENTENCES_FILE).is_file():
            sentences_file = folder / SENTENCES_FILE
            labels_file = folder / LABELS_FILE if (folder / LABELS_FILE).is_file() else None
        sentences, labels = read_sentences(sentences_file or EMBEDDED_SENTENCES, labels_file, max_sentences)
        try:
            device = resolve_device(device)
        except ValueError as error:
            raise DemoSetupError(str(error)) from None
        try:
            text = LatentText.from_pretrained(str(folder), local_files_only=True)
            text.model.to(device)
        except Exception as error:  # any failure to load is the folder's problem, and must stop the start-up
            raise DemoSetupError(f"cannot load the model in {folder}: {type(error).__name__}: {error}") from error
        source = str(sentences_file or EMBEDDED_SENTENCES)
        return cls(text, sentences, labels, source=source, name=folder.name, projection=projection)

    # -- inputs ------------------------------------------------------------------------------------------------------

    def sentence(self, value, name: str = "sentence") -> str:
        if not isinstance(value, str) or not value.strip():
            raise DemoInputError(f"{name} is empty: type a sentence.")
        if len(value) > self.limits.max_chars:
            raise DemoInputError(f"{name} has {len(value)} characters: at most {self.limits.max_chars}.")
        return value.strip()

    def _decoding(self, **settings) -> dict:
        return dict(GREEDY, max_new_tokens=self.limits.max_new_tokens, **settings)

    # -- the tabs -----------------------------------------------------------------------------------------------------

    def reconstruct(self, sentence) -> dict:
        """The greedy reconstruction, the latent's norm (and the map sentences' median norm, for scale) and the
        nearest map sentences by Euclidean distance in the latent."""
        sentence = self.sentence(sentence)
        with self.lock, evaluating(self.text.model):
            z = self.text.encode([sentence])
            output = self.text.decode(z, **self._decoding())[0]
        z = z.double().cpu()
        distances = (self.latents - z).norm(dim=1)
        nearest = distances.argsort()[:NEIGHBOURS].tolist()
        return dict(
            text=output,
            norm=float(z.norm()),
            typical_norm=self.typical_norm,
            neighbours=[(self.sentences[i], float(distances[i])) for i in nearest],
            xy=self.project(z)[0].tolist(),
        )

    def interpolate(self, sentence_a, sentence_b, steps) -> dict:
        """The texts decoded along the straight path between the two sentences' latents (`LatentText.interpolate`),
        and the path's points on the map."""
        a, b = self.sentence(sentence_a, "sentence A"), self.sentence(sentence_b, "sentence B")
        steps = _number(steps, "steps", self.limits.min_steps, self.limits.max_steps, whole=True)
        with self.lock, evaluating(self.text.model):
            texts = self.text.interpolate(a, b, steps=steps, **self._decoding())
            z = self.text.encode([a, b]).double().cpu()
        weights = torch.linspace(0, 1, steps, dtype=torch.float64).unsqueeze(1)
        return dict(texts=texts, xy=self.project(z[0] + weights * (z[1] - z[0])).tolist())

    def sample(self, num_samples, temperature, top_p, seed, around=None, radius=0.0) -> dict:
        """`num_samples` texts from the folder's prior (`LatentText.sample`) or, with `around`, from latents drawn
        around that sentence's: z + radius · σ_prior ⊙ ε (σ_prior: the prior's standard deviation per dimension, so a
        radius of 1 is one prior spread); decoded with temperature and top-p. `seed` fixes both draws."""
        limits = self.limits
        n = _number(num_samples, "samples", 1, limits.max_samples, whole=True)
        temperature = _number(temperature, "temperature", limits.min_temperature, limits.max_temperature)
        top_p = _number(top_p, "top-p", limits.min_top_p, 1.0)
        seed = _number(seed, "seed", 0, limits.max_seed, whole=True)
        if around is not None and str(around).strip():
            around = self.sentence(around, "sample around")
            radius = _number(radius, "radius", 0.0, limits.max_radius)
        else:
            around = None
        decoding = self._decoding(do_sample=True, temperature=temperature, top_p=top_p)
        with self.lock, evaluating(self.text.model):
            generator = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)  # generate() samples tokens from torch's global generator
            if around is None:
                texts = self.text.sample(n, generator=generator, **decoding)
            else:
                z = self.text.encode([around]).double().cpu()
                spread = self.text.model.prior_parameters()[1].detach().double().cpu()
                noise = torch.randn(n, z.shape[1], generator=generator, dtype=torch.float64)
                texts = self.text.decode(z + radius * spread * noise, **decoding)
        return dict(texts=texts, duplicate_of=_duplicates(texts))

    @property
    def classes(self) -> LatentClasses | None:
        return self.text.classes

    def edit(self, sentence, target, strength) -> dict:
        """The sentence moved towards class `target` by `strength` (in units of the gap between the class means:
        1 carries the source class's mean onto the target's), from the class its latent most likely lies in among
        the others; the edited text and log p(class | z) before and after."""
        if self.classes is None:
            raise DemoInputError(f"this folder has no {CLASSES_FILE}: there are no classes to edit towards.")
        sentence = self.sentence(sentence)
        if str(target).strip() not in self.classes.labels:
            raise DemoInputError(f"target class {target!r} is not one of {list(self.classes.labels)}.")
        target = str(target).strip()
        limit = self.limits.max_strength
        strength = _number(strength, "strength", -limit, limit)
        with self.lock, evaluating(self.text.model):
            z = self.text.encode([sentence])
            before = class_log_probs(self.classes, z)[0]
            others = [i for i, label in enumerate(self.classes.labels) if label != target]
            source = self.classes.labels[max(others, key=lambda i: float(before[i]))]
            direction = class_direction(self.classes, source, target)
            moved = self.text.edit_latents(z, direction, strength)
            output = self.text.decode(moved, **self._decoding())[0]
        after = class_log_probs(self.classes, moved)[0]
        return dict(
            text=output,
            source=source,
            log_probs={label: (float(before[i]), float(after[i])) for i, label in enumerate(self.classes.labels)},
            xy=self.project(torch.cat([z, moved])).tolist(),
        )

    def map_points(self, typed: str = "") -> dict:
        """The map: every map sentence's coordinates, label and text, and the sentences typed (one per line)."""
        lines = [line for line in (typed or "").splitlines() if line.strip()]
        if len(lines) > self.limits.max_typed:
            raise DemoInputError(f"{len(lines)} sentences typed: at most {self.limits.max_typed} on the map.")
        lines = [self.sentence(line, f"typed sentence {i + 1}") for i, line in enumerate(lines)]
        typed_xy = []
        if lines:
            with self.lock, evaluating(self.text.model):
                typed_xy = self.project(self.text.encode(lines)).tolist()
        labels = self.labels or ["sentence"] * len(self.sentences)
        return dict(xy=self.map_xy.tolist(), labels=labels, texts=self.sentences, typed=lines, typed_xy=typed_xy)


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------


def _frame(rows: list[tuple], columns: list[str]):
    import pandas

    return pandas.DataFrame(rows, columns=columns)


# The map's colours: the labels take the palette in order; typed sentences and paths stand out in red over grey. The
# plots' own legends are off (Gradio draws them below the plot, where its frame cuts them): the labels name the colours.
PALETTE = {
    "blue": "#1f77b4",
    "orange": "#ff7f0e",
    "green": "#2ca02c",
    "purple": "#9467bd",
    "brown": "#8c564b",
    "pink": "#e377c2",
    "cyan": "#17becf",
    "olive": "#bcbd22",
}
HIGHLIGHT, BACKGROUND = "#d62728", "#c8c8c8"


def _on_map(demo: LatentDemo, points: list[tuple[float, float, str, str]]):
    """The map's sentences in grey ("map") under the given points (x, y, kind, text), for the small plots."""
    rows = [(x, y, "map", text) for (x, y), text in zip(demo.map_xy.tolist(), demo.sentences)]
    return _frame(rows + list(points), ["x", "y", "kind", "text"])


def build_app(demo: LatentDemo, max_queue: int = 32):
    """The Gradio Blocks page of `demo`; its queue holds at most `max_queue` waiting requests."""
    import gradio as gr

    limits = demo.limits

    def guarded(handler):
        """Run a handler; an input out of bounds becomes a Gradio error, shown on the page."""

        def run(*args):
            try:
                return handler(*args)
            except DemoInputError as error:
                raise gr.Error(str(error)) from None

        run.__name__ = handler.__name__
        return run

    def reconstruct(sentence):
        result = demo.reconstruct(sentence)
        norm = f"‖z‖ = {result['norm']:.3f} (median over the map's sentences: {result['typical_norm']:.3f})"
        neighbours = _frame(
            [(i + 1, s, round(d, 3)) for i, (s, d) in enumerate(result["neighbours"])], ["#", "sentence", "distance"]
        )
        return result["text"], norm, neighbours

    def interpolate(sentence_a, sentence_b, steps):
        result = demo.interpolate(sentence_a, sentence_b, steps)
        points = [(x, y, "path", f"{i}: {t}") for i, ((x, y), t) in enumerate(zip(result["xy"], result["texts"]))]
        return "\n".join(result["texts"]), _on_map(demo, points)

    def sample(mode, around, radius, num_samples, temperature, top_p, seed):
        result = demo.sample(
            num_samples,
            temperature,
            top_p,
            seed,
            around=around if mode == "around a sentence" else None,
            radius=radius,
        )
        rows = [
            (i + 1, t, f"duplicate of #{d}" if d else "")
            for i, (t, d) in enumerate(zip(result["texts"], result["duplicate_of"]))
        ]
        return _frame(rows, ["#", "text", "duplicate"])

    def edit(sentence, target, strength):
        result = demo.edit(sentence, target, strength)
        rows = [(label, round(b, 3), round(a, 3)) for label, (b, a) in result["log_probs"].items()]
        figures = _frame(rows, ["class", "log p(class | z), sentence", "log p(class | z), edited"])
        return result["text"], f"moved from class {result['source']!r}", figures

    def draw_map(typed):
        result = demo.map_points(typed)
        rows = [(x, y, label, text) for (x, y), label, text in zip(result["xy"], result["labels"], result["texts"])]
        rows += [(x, y, "typed", text) for (x, y), text in zip(result["typed_xy"], result["typed"])]
        return _frame(rows, ["x", "y", "label", "text"])

    box = dict(max_length=limits.max_chars, lines=1)
    with gr.Blocks(title="scalevae demo") as page:
        gr.Markdown(
            f"# Scale-VAE latent space\nModel `{demo.name}`: {demo.text.model.config.latent_size}-dimensional latent, "
            f"collapse strategy `{demo.text.model.config.collapse_strategy}` · map: "
            f"{len(demo.sentences)} sentences of `{Path(demo.source).name}` · greedy decoding unless sampling · "
            f"at most {limits.max_chars} characters per sentence."
        )
        with gr.Tab("Reconstruct"):
            rec_in = gr.Textbox(label="sentence", elem_id="reconstruct-input", **box)
            rec_go = gr.Button("Reconstruct", elem_id="reconstruct-run")
            rec_out = gr.Textbox(label="reconstruction (greedy)", elem_id="reconstruct-output", interactive=False)
            rec_norm = gr.Markdown(elem_id="reconstruct-norm")
            rec_near = gr.Dataframe(label=f"the {NEIGHBOURS} nearest map sentences", interactive=False)
            rec_go.click(guarded(reconstruct), rec_in, [rec_out, rec_norm, rec_near], api_name="reconstruct")
        with gr.Tab("Interpolate"):
            with gr.Row():
                int_a = gr.Textbox(label="sentence A", elem_id="interpolate-a", **box)
                int_b = gr.Textbox(label="sentence B", elem_id="interpolate-b", **box)
            int_steps = gr.Slider(
                limits.min_steps, limits.max_steps, value=5, step=1, label="steps", elem_id="interpolate-steps"
            )
            int_go = gr.Button("Interpolate", elem_id="interpolate-run")
            int_out = gr.Textbox(
                label="texts along the path, A to B (one per line)", elem_id="interpolate-output", interactive=False
            )
            int_plot = gr.ScatterPlot(
                x="x",
                y="y",
                color="kind",
                color_map={"map": BACKGROUND, "path": HIGHLIGHT},
                colors_in_legend=[],
                tooltip=["text"],
                height=300,
                label="the path (red) on the map (grey); hover for the texts",
            )
            int_go.click(guarded(interpolate), [int_a, int_b, int_steps], [int_out, int_plot], api_name="interpolate")
        with gr.Tab("Sample"):
            prior = demo.text.model.config.prior
            smp_mode = gr.Radio([f"prior ({prior})", "around a sentence"], value=f"prior ({prior})", label="from")
            smp_around = gr.Textbox(label="sentence (for 'around a sentence')", **box)
            smp_radius = gr.Slider(0, limits.max_radius, value=0.5, step=0.05, label="radius (prior spreads)")
            with gr.Row():
                smp_n = gr.Slider(1, limits.max_samples, value=6, step=1, label="samples")
                smp_t = gr.Slider(limits.min_temperature, limits.max_temperature, value=1.0, label="temperature")
                smp_p = gr.Slider(limits.min_top_p, 1.0, value=0.9, label="top-p")
                smp_seed = gr.Number(0, precision=0, minimum=0, maximum=limits.max_seed, label="seed")
            smp_go = gr.Button("Sample", elem_id="sample-run")
            smp_out = gr.Dataframe(label="samples", elem_id="sample-output", interactive=False)
            smp_go.click(
                guarded(sample),
                [smp_mode, smp_around, smp_radius, smp_n, smp_t, smp_p, smp_seed],
                smp_out,
                api_name="sample",
            )
        with gr.Tab("Edit"):
            if demo.classes is None:
                gr.Markdown(
                    f"This folder has no `{CLASSES_FILE}`: fit the classes on labelled sentences with `scalevae "
                    "generate FOLDER --sample 1 --label CLASS --labelled_file TEXTS --label_file LABELS "
                    "--save_classes`, then restart the page."
                )
            else:
                labels = list(demo.classes.labels)
                edit_in = gr.Textbox(label="sentence", elem_id="edit-input", **box)
                edit_to = gr.Dropdown(labels, value=labels[-1], label="target class", elem_id="edit-target")
                edit_strength = gr.Slider(
                    -limits.max_strength, limits.max_strength, value=1.0, step=0.1, label="strength (1: the gap "
                    "between the class means)", elem_id="edit-strength",
                )  # fmt: skip
                edit_go = gr.Button("Edit", elem_id="edit-run")
                edit_out = gr.Textbox(label="edited text (greedy)", elem_id="edit-output", interactive=False)
                edit_from = gr.Markdown(elem_id="edit-source")
                edit_lp = gr.Dataframe(label="class log-probabilities of the latent", interactive=False)
                edit_go.click(
                    guarded(edit), [edit_in, edit_to, edit_strength], [edit_out, edit_from, edit_lp], api_name="edit"
                )
        with gr.Tab("Map"):
            # The map opens with one sentence placed on it: the plot fixes its colours from the first value it shows,
            # so "typed" must be among them from the start.
            map_typed = gr.Textbox(
                demo.sentences[0],
                label=f"sentences to place on the map (one per line, at most {limits.max_typed})",
                lines=3,
                elem_id="map-typed",
            )
            map_go = gr.Button("Draw", elem_id="map-run")
            names = sorted(set(demo.labels or ["sentence"]))
            named = [(name, list(PALETTE)[i % len(PALETTE)]) for i, name in enumerate(names)]
            colours = {name: PALETTE[colour] for name, colour in named} | {"typed": HIGHLIGHT}
            key = "labels: " + ", ".join(f"{n} {c}" for n, c in named) if demo.labels else "sentences blue"
            map_plot = gr.ScatterPlot(
                draw_map(demo.sentences[0]),
                x="x",
                y="y",
                color="label",
                color_map=colours,
                colors_in_legend=[],
                tooltip=["text"],
                height=560,
                label=f"{demo.projection} of the latents ({key}; typed red): hover for the text",
            )
            map_go.click(guarded(draw_map), map_typed, map_plot, api_name="map")
    page.queue(max_size=max_queue, default_concurrency_limit=1)
    return page


# ---------------------------------------------------------------------------------------------------------------------
# The command and the Space files
# ---------------------------------------------------------------------------------------------------------------------


def require_gradio():
    try:
        import gradio
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    return gradio


@dataclass
class DemoArguments:
    """`scalevae demo [FOLDER]`'s options, each declared once with its range (`scalevae.options.number`)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (default 127.0.0.1: this machine only)"})
    port: int = number(7860, low=1, high=65535, integer=True)
    sentences: str | None = field(
        default=None,
        metadata={
            "help": f"the map's sentences, one per line (default: FOLDER/{SENTENCES_FILE}, else the embedded corpus)"
        },
    )
    labels: str | None = field(default=None, metadata={"help": "one label per line of --sentences (colours the map)"})
    max_sentences: int = number(1000, low=2, high=MAX_MAP_SENTENCES, integer=True, help="sentences on the map")
    max_queue: int = number(32, low=1, high=1000, integer=True, help="requests waiting at most; more are refused")
    projection: str = field(
        default="auto",
        metadata={"help": "the map's: UMAP when umap-learn is installed (auto)", "choices": PROJECTIONS},
    )
    device: str = device_option("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OptionParser(
        DemoArguments, prog="scalevae demo", description="A local page over a saved model's latent space (Gradio)."
    )
    parser.add_argument(
        "folder", nargs="?", default=str(DEFAULT_FOLDER), help=f"a saved folder (default {DEFAULT_FOLDER})"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    validate_options(args, explicit_options(parser, argv), "demo", specs=field_specs(DemoArguments))
    return args


def serve(args: argparse.Namespace, host: str | None = "127.0.0.1", block: bool = True):
    """Load the folder (failing before any server starts), build the page and launch it; returns the page."""
    require_gradio()
    # The map's latents are computed once, before the page starts: a minute or more for a thousand sentences with a
    # BERT-size encoder on a small CPU, so say what is happening.
    print(f"scalevae demo: loading {args.folder}, encoding the map's sentences...", file=sys.stderr, flush=True)
    try:
        demo = LatentDemo.load(
            args.folder, args.sentences, args.labels, args.max_sentences, args.device, args.projection
        )
    except DemoSetupError as error:
        raise SystemExit(f"scalevae demo: {error}") from None
    page = build_app(demo, args.max_queue)
    page.launch(server_name=host, server_port=args.port, share=False, prevent_thread_lock=not block)
    return page


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page
    args = parse_args(argv)
    serve(args, host=args.host)


SPACE_APP = '''"""This model's page (`scalevae demo`), as a Hugging Face Space runs it: `python app.py` in this folder.
The folder carries the scalevae package it was saved with (scalevae/), so the Space needs only requirements.txt."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from scalevae.demo import parse_args, serve  # noqa: E402

# A Space sets GRADIO_SERVER_NAME (0.0.0.0) and the port; elsewhere the page stays on 127.0.0.1.
args = parse_args([os.path.dirname(os.path.abspath(__file__)), "--port", os.environ.get("GRADIO_SERVER_PORT", "7860")])
serve(args, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
'''


def space_requirements() -> list[str]:
    """What the Space installs: this package's own requirements (from its metadata) and Gradio."""
    from importlib import metadata

    try:
        requirements = [r for r in metadata.requires("scalevae") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        requirements = ["torch>=2.13", "transformers>=5.24,<6", "safetensors>=0.6", "numpy>=1.26"]
    return requirements + ["gradio>=6.31", "pandas>=2.2"]


def write_space_files(folder: str | os.PathLike) -> None:
    """Make a saved folder a Gradio Space: app.py, requirements.txt, a copy of this package (its Python files and
    the embedded corpus the map shows by default), so the folder runs as it is, and the Space's settings (`sdk`,
    `app_file`) in the model card's metadata, where the Hub reads them."""
    folder = Path(folder)
    card = folder / "README.md"
    header, separator, rest = card.read_text(encoding="utf-8").partition("---\n")
    if header or not separator:  # the card opens with its metadata block: add the Space's keys to it
        raise ValueError(f"{card} does not open with a metadata block (---): cannot make the folder a Space.")
    card.write_text(f"---\nsdk: gradio\napp_file: app.py\n{rest}", encoding="utf-8")
    (folder / "app.py").write_text(SPACE_APP, encoding="utf-8")
    (folder / "requirements.txt").write_text("\n".join(space_requirements()) + "\n", encoding="utf-8")
    package = Path(__file__).resolve().parent
    shutil.copytree(
        package, folder / "scalevae", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build_stdlib_corpus.py")
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
