"""scalevae: Scale-VAE text VAEs for Hugging Face transformers.

The model lives in the two top-level modules that every saved folder carries (`configuration_scalevae`,
`modeling_scalevae`); this package is the toolkit around them, one module per responsibility: `factory` (tokenizers,
building and loading models), `latent` (text-level latent operations), `control` (steering text through the latent,
measured on the text), `data`, `training` (Trainer glue), `metrics`, `card` (model cards), `hub` (saved folders and the
Hub), `plots`, `compare`, `quickstart` and `cli`.
"""

__version__ = "0.2.0"

from transformers import AutoConfig, AutoModel  # noqa: E402

from configuration_scalevae import ScaleVAEConfig  # noqa: E402
from modeling_scalevae import ScaleVAEEncoderOutput, ScaleVAEForLatentLM, ScaleVAEOutput  # noqa: E402

from .factory import build_model, load_pretrained, load_tokenizers, save_tokenizers  # noqa: E402
from .latent import AttributeDirection, LatentClasses, LatentText  # noqa: E402

# In-process registration, so the package's own users load folders with the auto classes without remote code.
AutoConfig.register(ScaleVAEConfig.model_type, ScaleVAEConfig, exist_ok=True)
AutoModel.register(ScaleVAEConfig, ScaleVAEForLatentLM, exist_ok=True)

__all__ = [
    "ScaleVAEConfig",
    "ScaleVAEForLatentLM",
    "ScaleVAEOutput",
    "ScaleVAEEncoderOutput",
    "LatentText",
    "AttributeDirection",
    "LatentClasses",
    "build_model",
    "load_pretrained",
    "load_tokenizers",
    "save_tokenizers",
]
