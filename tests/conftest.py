"""Shared fixtures: tiny random models on real tokenizers, and the real corpora read at run time."""

import os

# Nothing in the tests may reach the Hub: every model and tokenizer is a local folder. (Set before transformers and
# huggingface_hub are imported: they read it once.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Bit-exact comparisons across processes (the fresh-venv test compares logits exactly): MKL's results may otherwise
# depend on buffer alignment and on how many threads it picks under load. Subprocesses inherit these settings.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, GPT2Config  # noqa: E402

from configuration_scalevae import ScaleVAEConfig  # noqa: E402
from modeling_scalevae import ScaleVAEForLatentLM  # noqa: E402
from scalevae.factory import decoder_tokenizer_from_encoder, offline_encoder_path  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(
    vocab_size=120, latent_size=4, bos=1, eos=2, pad=0, encoder_pad=0, encoder_type="bert", dropout=0.1, **kwargs
):
    encoder_kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        pad_token_id=encoder_pad,
        max_position_embeddings=80,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    if encoder_type == "roberta":
        from transformers import RobertaConfig

        encoder = RobertaConfig(**encoder_kwargs)
    else:
        encoder = BertConfig(**encoder_kwargs)
    decoder = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=80,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return ScaleVAEConfig(encoder=encoder, decoder=decoder, latent_size=latent_size, **kwargs)


def tiny_model(seed=0, **kwargs) -> ScaleVAEForLatentLM:
    torch.manual_seed(seed)
    return ScaleVAEForLatentLM(tiny_config(**kwargs))


def random_batch(batch_size=4, length=7, vocab_size=120, seed=0, bos=1, eos=2):
    """Right-padded encoder and decoder inputs of varying lengths, labels -100 on padding."""
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


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return offline_encoder_path()


@pytest.fixture(scope="session")
def tokenizers(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path), decoder_tokenizer_from_encoder(minilm_path)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the real corpora are read at run time from ../shared/data")
    return path


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory, minilm_path) -> str:
    """A tiny random BERT on MiniLM's real tokenizer, saved as a local folder like any pretrained encoder."""
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=80,
        )
    ).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return str(path)


TINY_DECODER = dict(n_layer=1, n_embd=32, n_head=2, n_positions=80)
