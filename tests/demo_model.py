"""The tiny model the demo's tests and load test serve: a Scale-VAE trained for a few seconds on short Yelp reviews
(one batch, one thread), with the class Gaussians of their sentiment labels saved beside it, so every tab of the page
has something to show. Real text, read at run time from ../shared/data."""

from pathlib import Path

import torch

from scalevae import LatentText
from scalevae.factory import fit_decoder_tokenizer, prepare_decoder_tokenizer
from scalevae.hub import save_model
from tests.model_tester import ScaleVAEModelTester, train_on_one_batch

SENTENCES, STEPS, LATENT_SIZE, MAX_WORDS = 64, 300, 8, 10


def short_reviews(text_file: Path, label_file: Path, count: int = SENTENCES) -> tuple[list[str], list[str]]:
    """The first `count` reviews of at most `MAX_WORDS` words, half of each label, and their labels."""
    texts, labels = [], []
    per_label = {}
    for text, label in zip(text_file.read_text().splitlines(), label_file.read_text().splitlines()):
        label = label.strip()
        if len(text.split()) <= MAX_WORDS and per_label.get(label, 0) < count // 2:
            texts.append(text.strip())
            labels.append(label)
            per_label[label] = per_label.get(label, 0) + 1
        if len(texts) == count:
            break
    return texts, labels


def build_demo_folder(folder: Path, text_file: Path, label_file: Path, steps: int = STEPS) -> Path:
    """Train the tiny model on the short reviews, save it into `folder` with its class Gaussians; returns `folder`."""
    texts, labels = short_reviews(text_file, label_file)
    tokenizer = prepare_decoder_tokenizer(fit_decoder_tokenizer(texts, vocab_size=400))
    tester = ScaleVAEModelTester(latent_size=LATENT_SIZE, dropout=0.0, decoder_layers=1)
    model = tester.get_model_for_tokenizers(tokenizer, tokenizer, collapse_strategy="scale", scale_target_std=2.0)
    torch.manual_seed(0)
    train_on_one_batch(model, tokenizer, texts, steps, max_length=64)
    save_model(folder, model, tokenizer, tokenizer)
    text = LatentText.from_pretrained(folder)  # as the demo reads the folder (its max_length: 64 tokens)
    text.fit_classes(texts, labels)
    text.save_classes(folder)
    return folder
