"""Fine-tuning a saved model on other text: `scalevae train --model_name_or_path` and the Trainer example."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalevae import LatentText, load_tokenizers
from scalevae.cli import main
from scalevae.factory import load_for_finetuning
from tests.conftest import shared_file

REPO = Path(__file__).resolve().parents[1]
TRAINING = [
    "--max_length",
    "16",
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--use_cpu",
]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, train_command) -> Path:
    """A tiny Scale-VAE trained for 3 steps on PTB by `scalevae train`, with a non-default des_std."""
    output = tmp_path_factory.mktemp("base")
    data = shared_file("ptb.valid.txt")
    main(train_command(output, data, "--des_std", "0.8", "--max_steps", "3", "--save_strategy", "no"))
    return output / "final"


def finetune_command(base: Path, output: Path, *options: str) -> list[str]:
    return [
        "train",
        "--model_name_or_path",
        str(base),
        "--output_dir",
        str(output),
        "--train_file",
        str(shared_file("snli.valid.txt")),
        *TRAINING,
        *options,
    ]


def run_example(base: Path, output: Path) -> Path:
    spec = importlib.util.spec_from_file_location("finetune_with_trainer", REPO / "examples/finetune_with_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = shared_file("snli.valid.txt")
    return example.main(
        ["--model_name_or_path", str(base), "--train_file", str(text), "--max_steps", "3"]
        + ["--per_device_train_batch_size", "4"]
        + ["--max_length", "16", "--output_dir", str(output)]
    )


def assert_continues(base: Path, tuned: Path, steps: int) -> None:
    """Other weights, the same tokenizers, and the Scale-VAE buffers carried on rather than reset."""
    before, after = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert before.keys() == after.keys()
    learned = [key for key in before if not key.startswith(("collapse.", "fitted_prior."))]
    assert any(not torch.equal(before[key], after[key]) for key in learned), "fine-tuning changed no weight"
    for old, new in zip(load_tokenizers(base), load_tokenizers(tuned)):
        assert old.get_vocab() == new.get_vocab() and old.all_special_tokens == new.all_special_tokens
    assert not torch.equal(before["collapse.scale_factors"], torch.ones(4))
    assert not torch.equal(after["collapse.scale_factors"], torch.ones(4))
    # The schedule's optimizer-step count goes on from the saved one: the buffers were loaded, not rebuilt.
    assert int(after["collapse.steps"]) == int(before["collapse.steps"]) + steps
    text = LatentText.from_pretrained(tuned)
    assert len(text.sample(2, max_new_tokens=4, generator=torch.Generator().manual_seed(0))) == 2
    assert len(text.reconstruct(["a man is sleeping ."], max_new_tokens=4)) == 1


def test_cli_finetunes_a_saved_model_with_an_override(base_model, tmp_path):
    main(finetune_command(base_model, tmp_path, "--kl_weight", "0.5"))
    tuned = tmp_path / "final"
    assert_continues(base_model, tuned, steps=3)
    config = LatentText.from_pretrained(tuned).model.config
    assert config.kl_weight == 0.5  # given: overrides the saved 1.0
    assert config.scale_target_std == 0.8 and config.latent_size == 4  # not given: the saved values, not defaults
    assert "fine_tuned_from" in (tuned / "README.md").read_text()


def test_example_finetunes_with_the_trainer(base_model, tmp_path):
    tuned = run_example(base_model, tmp_path)
    assert_continues(base_model, tuned, steps=3)


def test_an_override_the_weights_cannot_follow_is_refused_by_name(base_model, tmp_path):
    with pytest.raises(ValueError, match=r"--latent_size 8 \(saved: 4\)"):
        main(finetune_command(base_model, tmp_path, "--latent_size", "8"))
    with pytest.raises(ValueError, match="--decoder_width only build"):
        main(finetune_command(base_model, tmp_path, "--decoder_width", "64"))
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize(
    "overrides, refused",
    [
        ({"latent_injection": "both"}, "latent_injection"),  # the base model has the default, "memory"
        ({"collapse_strategy": "vae"}, "collapse_strategy"),  # Scale-VAE's buffers have nowhere to go
        ({"collapse_strategy": "bn"}, "collapse_strategy"),
        ({"prior": "scaled", "kl_weight": 0.5}, "prior"),
        ({"freeze_encoder": 5}, "freeze_encoder"),  # the tiny encoder has 1 layer
    ],
)
def test_overrides_that_change_the_architecture_are_refused(base_model, overrides, refused):
    with pytest.raises(ValueError, match=rf"{refused}") as error:
        load_for_finetuning(str(base_model), overrides)
    if "kl_weight" in overrides:  # the legal override is not blamed along with the illegal one
        assert "--kl_weight" not in str(error.value).splitlines()[0]


def test_overrides_the_weights_follow_are_applied(base_model):
    legal = dict(
        kl_weight=0.25,
        scale_target_std=1.5,
        scale_momentum=0.1,
        scale_schedule="epoch",
        free_bits=0.1,
        prior_momentum=0.05,
        freeze_encoder=True,
    )
    model = load_for_finetuning(str(base_model), legal)
    assert {name: getattr(model.config, name) for name in legal} == legal
    assert model.collapse.target_std == 1.5 and model.collapse.schedule == "epoch"
    assert not any(parameter.requires_grad for parameter in model.encoder.parameters())


def test_strategies_without_buffers_switch_and_bn_gamma_is_refused(tmp_path, tiny_encoder_path):
    from scalevae import build_model
    from scalevae.hub import save_model
    from tests.conftest import TINY_DECODER

    for strategy in ("vae", "bn"):
        model, encoder_tokenizer, decoder_tokenizer = build_model(
            tiny_encoder_path, latent_size=4, collapse_strategy=strategy, decoder_config_overrides=TINY_DECODER
        )
        save_model(tmp_path / strategy, model, encoder_tokenizer, decoder_tokenizer)
    for strategy in ("free_bits", "ae"):
        model = load_for_finetuning(str(tmp_path / "vae"), {"collapse_strategy": strategy})
        assert model.config.collapse_strategy == strategy
    # BN-VAE's γ is a saved buffer: the strict loader refuses a config that disagrees with it.
    with pytest.raises(ValueError, match=r"(?s)--bn_gamma 0.9 \(saved: 0.5\).*weights hold γ=0.5"):
        load_for_finetuning(str(tmp_path / "bn"), {"bn_gamma": 0.9})
