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

from tests.data_guard import SHARED_DATA, data_skip_failure, pytest_runtest_makereport, shared_file  # noqa: E402, F401
from tests.model_tester import tester  # noqa: E402

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
