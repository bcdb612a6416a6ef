"""Command-line options: one validation for every command, each numeric option checked with its range, options that do
nothing in the mode warned about once, and usage errors that name the option."""

import json
import logging
import os
import shutil
from argparse import Namespace
from pathlib import Path

import pytest

import scalevae
from scalevae.cli import main
from scalevae.options import (
    OptionError,
    check_max_length,
    check_output_folder,
    field_specs,
    number,
    validate_options,
)
from tests.model_tester import (
    corpus_file,
    evaluate_args,
    folder_bytes,
    tester,
)

# -- one validation for every command -----------------------------------------------------------------------------


def command_sections() -> dict[str, tuple]:
    """The dataclasses each command parses: its options and their ranges are declared on their fields."""
    from transformers import TrainingArguments

    from scalevae.cli import EditArguments, EvaluateArguments, GenerateArguments
    from scalevae.compare import CompareArguments
    from scalevae.demo import DemoArguments
    from scalevae.options import DataArguments, ModelArguments, RunArguments
    from scalevae.quickstart import QuickstartArguments

    run = (ModelArguments, DataArguments, RunArguments, TrainingArguments)
    return {
        "train": run,
        "quickstart": (*run, QuickstartArguments),
        "compare": (*run, CompareArguments),
        "evaluate": (EvaluateArguments,),
        "generate": (GenerateArguments,),
        "edit": (EditArguments,),
        "demo": (DemoArguments,),
    }


def command_specs(command: str) -> dict:
    return field_specs(*command_sections()[command])


def test_every_numeric_option_of_our_dataclasses_declares_its_range():
    """Each command's numeric options carry their range on their field (`number(...)`): one declaration, read by the
    parser, the validator and the help text. A new numeric field without one fails here."""
    import dataclasses
    import typing

    def numeric(annotation) -> bool:  # int, float, or an Optional or list of them
        if annotation in (int, float):
            return True
        return any(numeric(part) for part in typing.get_args(annotation))

    for command, sections in command_sections().items():
        for section in sections:
            if section.__module__.startswith("transformers"):
                continue  # the stock TrainingArguments: their ranges are our TRAINING_OPTIONS table
            hints = typing.get_type_hints(section)
            for item in dataclasses.fields(section):
                if numeric(hints[item.name]):
                    assert "range" in item.metadata, f"{command}: --{item.name} declares no range"
                    assert item.metadata["range"].describe() in item.metadata["help"], item.name


@pytest.mark.parametrize(
    "command, option, value, mode, message",
    [
        ("quickstart", "max_steps", 0, {}, r"--max_steps 0: must be a whole number >= 1"),
        ("quickstart", "train_minutes", 0.0, {}, r"--train_minutes 0.0: must be a number > 0"),
        ("evaluate", "max_sentences", 0, {}, r"--max_sentences 0: must be a whole number >= 1"),
        ("evaluate", "max_sentences", -1, {}, r"--max_sentences -1: must be a whole number >= 1"),
        ("evaluate", "num_importance_samples", -1, {}, r"--num_importance_samples -1: must be a whole number >= 0"),
        ("compare", "max_steps", 0, {}, r"--max_steps 0: must be a whole number >= 1"),
        ("compare", "max_steps", -5, {}, r"--max_steps -5"),
        ("compare", "seeds", [0, -1], {}, r"--seeds -1: must be a whole number in \[0, 4294967295\]"),
        (
            "train",
            "kl_warmup_steps",
            -5,
            {"kl_schedule": "linear"},
            r"--kl_warmup_steps -5: must be a whole number >= 1",
        ),
        ("train", "kl_warmup_steps", None, {"kl_schedule": "linear"}, r"--kl_schedule linear needs --kl_warmup_steps"),
        ("train", "decoder_width", 0, {}, r"--decoder_width 0: must be a whole number in \[1, 65536\]"),
        ("train", "decoder_vocab_size", 100, {}, r"--decoder_vocab_size 100: must be a whole number in \[259,"),
        ("train", "learning_rate", float("nan"), {}, r"--learning_rate nan: must be a number > 0"),
        ("generate", "top_p", 2.0, {"do_sample": True}, r"--top_p 2.0: must be a number in \(0, 1\]"),
        ("generate", "num_beams", 0, {}, r"--num_beams 0: must be a whole number in \[1, 256\]"),
        ("generate", "temperature", float("inf"), {"do_sample": True}, r"--temperature inf: must be a number > 0"),
        ("generate", "sample", 2.5, {}, r"--sample 2.5: must be a whole number in \[1, 65536\]"),
    ],
)
def test_every_numeric_option_is_checked_with_its_range(command, option, value, mode, message):
    options = Namespace(**{option: value, **mode})
    with pytest.raises(OptionError, match=rf"^{command}: {message}"):
        validate_options(options, given={option, *mode}, command=command, specs=command_specs(command))


def test_options_that_do_nothing_in_the_mode_warn_once(caplog, monkeypatch):
    monkeypatch.setattr(scalevae.options, "_warned", set())  # what earlier tests of this process warned about
    specs = command_specs("generate")
    options = Namespace(do_sample=False, top_p=0.9, temperature=0.7, num_beams=2, interpolate=None, steps=4)
    with caplog.at_level(logging.WARNING, logger="scalevae.options"):
        warnings = validate_options(options, {"top_p", "temperature", "num_beams", "steps"}, "generate", specs=specs)
        validate_options(options, {"top_p", "temperature", "num_beams", "steps"}, "generate", specs=specs)
    assert warnings == [
        "generate: --steps does nothing without --interpolate; it is ignored.",
        "generate: --temperature does nothing without --do_sample; it is ignored.",
        "generate: --top_p does nothing without --do_sample; it is ignored.",
    ]
    assert sorted(r.getMessage() for r in caplog.records) == warnings  # once each, not once per call
    assert validate_options(options, {"num_beams"}, "generate", specs=specs) == []  # defaults never warn


def test_a_run_specs_sections_are_validated_together():
    """RunSpec.parse checks every section's given options against the ranges on their fields at parse time."""
    from scalevae.options import merged_options
    from scalevae.recipe import RunSpec

    argv = ["--output_dir", "x", "--kl_n_cycle", "3", "--train_minutes", "0", "--max_steps", "-1"]
    with pytest.raises(OptionError, match=r"^train: --max_steps -1: must be a whole number >= 1"):
        RunSpec.parse(argv)
    with pytest.raises(OptionError, match=r"^quickstart: --train_minutes 0.0: must be a number > 0"):
        RunSpec.parse(argv[:-2], command="quickstart")  # max_steps left at TrainingArguments' -1: not checked
    spec, given, _ = RunSpec.parse(argv[:4])
    options = merged_options(spec.model, spec.data, spec.run, spec.training)
    (warning,) = validate_options(options, given, "train", specs=command_specs("train"))
    assert warning == "train: --kl_n_cycle does nothing without --kl_schedule cyclical; it is ignored."


def test_a_dataclass_of_options_declares_its_ranges_in_one_place():
    import dataclasses
    from dataclasses import dataclass

    @dataclass
    class GenerateOptions:
        do_sample: bool = False
        top_p: float | None = number(low=0, high=1, low_open=True, only_with="do_sample", help="nucleus mass")
        beams: int = number(1, low=1, integer=True)
        warmup: int | None = number(low=1, integer=True, required_with=("schedule", "linear"))
        schedule: str = "constant"

    help_text = {f.name: f.metadata.get("help") for f in dataclasses.fields(GenerateOptions)}
    assert help_text["top_p"] == "nucleus mass (a number in (0, 1])"
    assert validate_options(GenerateOptions(top_p=0.5)) == ["--top_p does nothing without --do_sample; it is ignored."]
    assert validate_options(GenerateOptions(do_sample=True, top_p=1.0)) == []
    with pytest.raises(OptionError, match=r"--beams 0: must be a whole number >= 1"):
        validate_options(GenerateOptions(beams=0))
    with pytest.raises(OptionError, match=r"--schedule linear needs --warmup"):
        validate_options(GenerateOptions(schedule="linear"))
    with pytest.raises(OptionError, match=r"width 30 is not a multiple"):
        validate_options(GenerateOptions(), checks=[lambda o: "width 30 is not a multiple of 4"])


# -- train's options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_max_steps_zero_is_refused(tmp_path, train_command, train_data, steps):
    with pytest.raises(ValueError, match=rf"--max_steps {steps}: must be a whole number >= 1"):
        main(train_command(tmp_path, train_data, "--max_steps", steps))
    assert not (tmp_path / "final").exists()


def test_max_length_beyond_the_decoder_positions_is_refused(tmp_path, train_command, train_data):
    with pytest.raises(
        ValueError,
        match=r"--max_length 200: must be a whole number in \[2, \d+\] \(the encoder takes \d+ tokens, the decoder 128 positions",
    ):
        main(train_command(tmp_path, train_data, "--max_steps", "1") + ["--max_length", "200"])


def test_max_length_fits_both_the_encoder_and_the_decoder():
    short_encoder = tester.get_config(encoder_positions=40, decoder_positions=80)
    check_max_length(40, short_encoder)
    with pytest.raises(
        OptionError, match=r"--max_length 41: .*\[2, 40\] \(the encoder takes 40 tokens, the decoder 80"
    ):
        check_max_length(41, short_encoder)
    memory = tester.get_config(encoder_positions=512, decoder_positions=80, latent_injection="memory")
    with pytest.raises(OptionError, match=r"--max_length 100000: .*\[2, 79\].*of which the latent takes one"):
        check_max_length(100000, memory)
    check_max_length(80, tester.get_config(encoder_positions=512, decoder_positions=80, latent_injection="embedding"))


# -- the output folder --------------------------------------------------------------------------------------------


def test_the_output_folder_is_never_the_input_model_folder(tmp_path):
    model = tmp_path / "runs" / "final"
    model.mkdir(parents=True)
    os.symlink(model, tmp_path / "link")
    for output, relation in [
        (model, "is"),
        (tmp_path / "link", "is"),
        (model / "more", "lies inside"),
        (tmp_path / "runs", "holds"),
    ]:
        with pytest.raises(OptionError, match=rf"--output_dir {output} {relation} the input model folder {model}"):
            check_output_folder(output, model)
    check_output_folder(tmp_path / "other", model, None, "someone/hub-model")  # no local folder in common


def test_fine_tuning_never_writes_into_the_model_folder_it_reads(tiny_folder, tmp_path):
    """`train --model_name_or_path D --output_dir D` wrote checkpoints and final/ inside the input folder."""
    data = corpus_file(tmp_path, lines=16)
    before = {p.name: p.stat().st_mtime_ns for p in tiny_folder.iterdir()}
    for output in (tiny_folder, tiny_folder.parent):
        argv = [
            "train",
            "--model_name_or_path",
            str(tiny_folder),
            "--output_dir",
            str(output),
            "--train_file",
            str(data),
        ]
        with pytest.raises(
            OptionError, match=rf"--output_dir {output} (is|holds) the input model folder {tiny_folder}"
        ):
            main([*argv, "--max_steps", "1", "--report_to", "none", "--use_cpu", "--max_length", "16"])
    assert {p.name: p.stat().st_mtime_ns for p in tiny_folder.iterdir()} == before


# -- outputs: checked before the work, never inside a model folder nor an input (issue 28) ---------------------------------------


@pytest.fixture
def test_file(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("the cat sat\na dog ran far\nthree words here\n")
    return path


@pytest.mark.parametrize(
    "output, match",
    [
        ("model/model.safetensors", r"--output .*model.safetensors lies inside the input model folder"),
        ("model/config.json", r"--output .*config.json lies inside the input model folder"),
        ("model/eval_results.json", r"lies inside the input model folder"),
        ("model/decoder_tokenizer/new.json", r"lies inside the input model folder"),
        ("model", r"lies inside|is the input model folder|is a folder"),
        ("test.txt", r"--output .*test.txt is the input file"),
        ("other/config.json", r"--output .*config.json lies inside the model folder .*other"),
        ("subdir", r"--output .*subdir is a folder: give a file name"),
    ],
)
def test_evaluate_refuses_an_output_inside_a_model_folder_before_any_work(
    tiny_folder, tmp_path, test_file, output, match, monkeypatch
):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    shutil.copytree(tiny_folder, tmp_path / "other")  # another model folder, not an input of the command
    (tmp_path / "subdir").mkdir()
    before = folder_bytes(folder), test_file.read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("the output was checked after the work started")

    monkeypatch.setattr(scalevae.factory, "load_pretrained", no_work)
    with pytest.raises(OptionError, match=match):
        main(evaluate_args(folder, test_file, "--output", str(tmp_path / output)))
    assert (folder_bytes(folder), test_file.read_bytes()) == before


def test_evaluate_writes_only_where_asked_and_atomically(tiny_folder, tmp_path, test_file, capsys):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    before = folder_bytes(folder)
    main(evaluate_args(folder, test_file))
    assert folder_bytes(folder) == before  # without --output: printed, nothing written
    assert "kl" in capsys.readouterr().out
    output = tmp_path / "figures" / "metrics.json"
    main(evaluate_args(folder, test_file, "--output", str(output)))
    assert json.loads(output.read_text())["kl"] is not None
    assert sorted(p.name for p in output.parent.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("command", ["train", "quickstart", "compare"])
def test_run_commands_refuse_an_output_folder_inside_a_model_folder_at_parse_time(tiny_folder, tmp_path, command):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "model"))
    with pytest.raises(OptionError, match=r"--output_dir .*runs lies inside the model folder"):
        main([command, "--output_dir", str(folder / "runs"), "--max_steps", "1"])


def test_evaluate_names_the_importance_samples_as_every_command_does(tiny_folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(tiny_folder), "--data", "x.txt", "--num_samples", "3"])
    assert exit_.value.code == 2
    assert "--num_samples is now --num_importance_samples" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--claims", "--control"])
def test_train_refuses_claims_or_control_without_the_test_split(tmp_path, flag):
    with pytest.raises(
        OptionError, match=rf"train: {flag} measures on the test split: give --test_file and --eval_splits test"
    ):
        main(["train", "--output_dir", str(tmp_path / "run"), flag])
    assert not (tmp_path / "run").exists()
