"""The `scalevae` command on saved folders: evaluate, generate, train."""

import json
import math

import pytest
import torch

import scalevae
from scalevae import hub, save_tokenizers
from scalevae.cli import main
from scalevae.data import load_text_dataset
from scalevae.hub import save_model
from tests.conftest import shared_file
from tests.model_tester import corpus_file, evaluate_args, tester


@pytest.fixture(scope="module", params=["save_model", "save_pretrained"])
def saved_folder(request, tmp_path_factory, tiny_encoder_path):
    model, encoder_tokenizer, decoder_tokenizer = tester.build(tiny_encoder_path)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    if request.param == "save_model":
        save_model(folder, model, encoder_tokenizer, decoder_tokenizer)
    else:
        model.save_pretrained(folder)
        save_tokenizers(folder, encoder_tokenizer, decoder_tokenizer)
    return folder


def test_evaluate_prints_and_writes_every_metric(saved_folder, tmp_path, capsys):
    data = shared_file("ptb.test.txt")
    output = tmp_path / "metrics.json"
    main(
        [
            "evaluate",
            str(saved_folder),
            "--data",
            str(data),
            "--max_sentences",
            "6",
            "--num_importance_samples",
            "3",
            "--max_length",
            "16",
            "--output",
            str(output),
        ]
    )
    metrics = json.loads(output.read_text())
    for key in ("nll", "ppl", "elbo", "kl", "decoder_kl", "mi", "au", "au_decoder", "bleu", "shuffle_gap"):
        # NaN is written as null (JSON has no NaN), so a figure not computed reads None: present, a finite number
        assert isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key]), (key, metrics.get(key))
    assert metrics["num_sentences"] == 6
    printed = capsys.readouterr().out
    assert "nll" in printed and str(output) in printed


@pytest.mark.parametrize(
    "arguments, lines",
    [
        (["--sample", "3", "--do_sample", "--top_p", "0.9"], 3),
        (["--reconstruct", "the cat sat", "a dog ran"], 2),
        (["--interpolate", "the cat sat", "a dog ran", "--steps", "4"], 4),
        (["--analogy", "the cat", "the cats", "a dog"], 1),
        (["--reconstruct", "the cat sat", "--num_beams", "3"], 1),
    ],
)
def test_generate_modes(saved_folder, capsys, arguments, lines):
    main(["generate", str(saved_folder), "--max_new_tokens", "5", *arguments])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == lines


def test_generate_needs_a_mode(saved_folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(saved_folder)])
    assert exit_.value.code == 2
    assert (
        "scalevae generate: error: one of the arguments --sample --reconstruct --interpolate --analogy is required"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--interpolate", "a"], "argument --interpolate: expected 2 arguments"),
        (["--analogy", "a", "b"], "argument --analogy: expected 3 arguments"),
        (["--sample", "2", "--reconstruct", "a"], "argument --reconstruct: not allowed with argument --sample"),
    ],
)
def test_generate_takes_one_mode_with_its_count_of_texts(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path), *arguments])
    assert exit_.value.code == 2 and f"scalevae generate: error: {message}" in capsys.readouterr().err


def test_train_command_trains_and_saves(tmp_path, train_command):
    data = shared_file("ptb.valid.txt")
    options = ["--max_steps", "2", "--save_strategy", "no", "--kl_schedule", "linear", "--kl_warmup_steps", "2"]
    main(train_command(tmp_path, data, *options))
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert "scalevae train" in (tmp_path / "final" / "README.md").read_text()


def test_every_config_field_is_a_train_option_and_a_new_field_arrives_by_itself(capsys):
    import dataclasses

    from transformers import HfArgumentParser

    from configuration_scalevae import ScaleVAEConfig
    from scalevae.options import config_arguments, config_kwargs_from

    options = {item.name for item in dataclasses.fields(config_arguments())}
    settable = set(ScaleVAEConfig.__annotations__) - {
        "encoder",
        "decoder",
        "scalevae_format_version",
        "scalevae_version",
    }
    assert options == settable

    class ExtendedConfig(ScaleVAEConfig):
        r"""
        Args:
            new_knob (`float`, defaults to 0.3):
                A knob added after the CLI was written.
        """

        new_knob: float = 0.3

    parser = HfArgumentParser(config_arguments(ExtendedConfig))
    (args,) = parser.parse_args_into_dataclasses(["--new_knob", "0.7", "--des_std", "0.5", "--freeze_encoder", "2"])
    kwargs = config_kwargs_from(args)
    assert kwargs["new_knob"] == 0.7 and kwargs["scale_target_std"] == 0.5 and kwargs["freeze_encoder"] == 2
    assert "A knob added after the CLI was written." in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--freeze_encoder", "some"])
    assert (
        "argument --freeze_encoder/--freeze-encoder: 'some': give true, false or a number" in capsys.readouterr().err
    )
    (args,) = parser.parse_args_into_dataclasses(["--freeze_encoder", "false"])
    assert config_kwargs_from(args)["freeze_encoder"] is False


# -- scalevae evaluate is evaluate_model -------------------------------------------------------------------------------


def test_evaluate_without_importance_samples_writes_valid_json(tmp_path, tiny_parts):
    folder = hub.save_model(tmp_path / "model", *tiny_parts)
    data = tmp_path / "test.txt"
    data.write_text("the cat sat\na dog ran far\nthree words here\n")
    output = tmp_path / "metrics.json"
    main(evaluate_args(folder, data, "--output", str(output)))

    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads(output.read_text(), parse_constant=no_nan)
    assert metrics["nll"] is None and metrics["kl"] is not None


def test_the_evaluate_command_equals_evaluate_model_on_the_same_data(tiny_folder, tmp_path):
    from torch.utils.data import DataLoader

    from scalevae.data import DataCollatorForLatentLM, tokenize_dataset
    from scalevae.metrics import evaluate_model

    data, output = corpus_file(tmp_path, lines=10), tmp_path / "metrics.json"
    argv = ["evaluate", str(tiny_folder), "--data", str(data), "--num_importance_samples", "3", "--max_length", "16"]
    main([*argv, "--batch_size", "4", "--seed", "5", "--device", "cpu", "--output", str(output)])
    written = json.loads(output.read_text())

    model, encoder_tokenizer, decoder_tokenizer = scalevae.load_pretrained(tiny_folder)
    dataset, _ = tokenize_dataset(load_text_dataset({"test": data})["test"], encoder_tokenizer, decoder_tokenizer, 16)
    loader = DataLoader(
        dataset, batch_size=4, collate_fn=DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    )
    expected = evaluate_model(
        model, loader, num_importance_samples=3, generator=torch.Generator().manual_seed(5), progress=False
    )
    assert expected["num_sentences"] == 10
    for key, value in expected.items():
        assert written[key] == (None if value != value else pytest.approx(value, rel=1e-12, abs=1e-12)), key


# Bad command lines of every command, as a user types them: each must end in one line that names the problem.
MISTAKES = [
    (["train", "--output_dir", "{tmp}/run", "--max_steps", "0"], 2, "scalevae train: error: --max_steps 0"),
    (["train", "--output_dir", "{tmp}/run", "--train_file", "{tmp}/none.txt"], 1, "none.txt"),
    (["quickstart", "--train_minutes", "-1"], 2, "scalevae quickstart: error: --train_minutes -1.0"),
    (["compare", "--seeds", "0", "-1"], 2, "scalevae compare: error: --seeds -1"),
    (["evaluate", "{tmp}/none", "--data", "{tmp}/none.txt", "--batch_size", "0"], 2, "--batch_size 0"),
    (["evaluate", "{tmp}/none", "--data", "{tmp}/none.txt"], 1, "{tmp}/none"),
    (["generate", "{tmp}/none", "--sample", "1"], 1, "the model {tmp}/none does not exist"),
    (["generate", "{tmp}/none", "--sample", "2", "--top_p", "1.5", "--do_sample"], 2, "--top_p 1.5"),
    (
        ["edit", "x", "--labelled_file", "a", "--label_file", "b", "--to", "1", "--strength", "nan"],
        2,
        "--strength nan",
    ),
]


@pytest.mark.parametrize("argv, status, message", MISTAKES, ids=lambda value: str(value)[:40])
def test_the_program_reports_a_mistake_in_one_line_not_a_traceback(tmp_path, argv, status, message):
    import subprocess
    import sys

    argv = [part.format(tmp=tmp_path) for part in argv]
    result = subprocess.run(
        [sys.executable, "-c", "from scalevae.cli import console; console()", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert message.format(tmp=tmp_path) in result.stderr.strip().splitlines()[-1]
