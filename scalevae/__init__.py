"""scalevae: Scale-VAE text VAEs for Hugging Face transformers.

The model lives in the two top-level modules that every saved folder carries (`configuration_scalevae`,
`modeling_scalevae`); this package is the toolkit around them: data, training glue, metrics, CLI and plots.
"""

from configuration_scalevae import ScaleVAEConfig
from modeling_scalevae import ScaleVAEEncoderOutput, ScaleVAEForLatentLM, ScaleVAEOutput

from . import hub  # noqa: F401  (registers the classes with AutoConfig / AutoModel)
from .text import LatentText, build_model, load_pretrained, load_tokenizers, save_tokenizers

__version__ = "0.1.0"

__all__ = [
    "ScaleVAEConfig",
    "ScaleVAEForLatentLM",
    "ScaleVAEOutput",
    "ScaleVAEEncoderOutput",
    "LatentText",
    "build_model",
    "load_pretrained",
    "load_tokenizers",
    "save_tokenizers",
]
