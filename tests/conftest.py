"""The test environment (offline, bit-exact), the real corpora read at run time, and the session fixtures; the tiny
models, inputs and tokenizers come from tests/model_tester.py."""

import os

# Nothing in the tests may reach the Hub: every model and tokenizer is a local folder. (Set before transformers and
# huggingface_hub are imported: they read it once.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Bit-exact comparisons across processes (the fresh-venv test compares logits exactly): MKL's results may otherwise
# depend on buffer alignment and on how many threads it picks under load. Subprocesses inherit these settings.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")


import pytest  # noqa: E402
import torch  # noqa: E402

from tests.data_guard import SHARED_DATA, data_skip_failure, pytest_runtest_makereport, shared_file  # noqa: E402, F401
from tests.model_tester import TOKEN, tester  # noqa: E402

# The names other test files import from here, over the one tester in model_tester.py.
tiny_config = tester.get_config
tiny_model = tester.get_model
random_batch = tester.prepare_inputs
TINY_DECODER = tester.decoder_overrides()


# The session fixtures: the only builders whose result pytest caches, because they read or write disk.


@pytest.fixture(scope="session")
def tokenizers():
    """MiniLM's tokenizer and the decoder tokenizer derived from it, loaded once; tests must not modify them."""
    return tester.get_tokenizers()


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory) -> str:
    """A tiny random BERT on MiniLM's real tokenizer, saved as a local folder like any pretrained encoder."""
    return tester.save_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def train_command(tiny_encoder_path):
    """The one tiny `scalevae train` command line: the tiny encoder, a 4-dimensional latent, a 1-layer 32-wide decoder,
    16 tokens, batch 4, CPU, seed 0, no reporting. `extra` options come last, so they win over these (argparse keeps an
    option's last value)."""

    def command(output_dir, train_file, *extra):
        return [
            "train",
            "--output_dir",
            str(output_dir),
            "--encoder",
            tiny_encoder_path,
            "--latent_size",
            "4",
            "--train_file",
            str(train_file),
            "--max_length",
            "16",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--use_cpu",
            "--decoder_layers",
            "1",
            "--decoder_width",
            "32",
            "--decoder_heads",
            "2",
            "--seed",
            "0",
            "--logging_steps",
            "2",
            *extra,
        ]

    return command


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """The first 64 sentences of PTB's validation file, as a local file."""
    lines = shared_file("ptb.valid.txt").read_text().splitlines()[:64]
    path = tmp_path_factory.mktemp("data") / "ptb.train.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, train_command, train_data):
    """`scalevae train` for 6 steps, a checkpoint every 3, an access token on the command line (it must not be
    recorded). On one thread, so that a rerun elsewhere (tests/test_resume.py) adds its floats in the same order."""
    from scalevae.cli import main

    output = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(train_command(output, train_data, "--max_steps", "6", "--save_steps", "3", "--hub_token", TOKEN))
    finally:
        torch.set_num_threads(threads)
    return output


@pytest.fixture(scope="session")
def tiny_parts(tiny_encoder_path):
    """(model, encoder tokenizer, decoder tokenizer) built on the tiny encoder; tests must not modify them."""
    return tester.build(tiny_encoder_path)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_parts):
    """A complete save_model folder of the tiny model; tests that change it take `tiny_folder_copy`."""
    from scalevae import hub

    return hub.save_model(tmp_path_factory.mktemp("saved") / "model", *tiny_parts)


@pytest.fixture
def tiny_folder_copy(tiny_folder, tmp_path):
    import shutil
    from pathlib import Path

    return Path(shutil.copytree(tiny_folder, tmp_path / "model"))
