import pytest
from transformers import BertConfig, GPT2Config, RobertaConfig

from configuration_scalevae import ScaleVAEConfig
from tests.model_tester import tester


def test_defaults_and_nested_round_trip():
    config = tester.get_config(collapse_strategy="free_bits", free_bits=0.25)
    data = config.to_dict()
    assert isinstance(data["encoder"], dict) and data["encoder"]["model_type"] == "bert"
    assert isinstance(data["decoder"], dict) and data["decoder"]["model_type"] == "gpt2"
    again = ScaleVAEConfig.from_dict(data)
    assert again.to_dict() == data
    assert isinstance(again.encoder, BertConfig) and isinstance(again.decoder, GPT2Config)
    assert again.free_bits == 0.25
    default = ScaleVAEConfig()
    assert (default.latent_size, default.latent_injection, default.collapse_strategy) == (32, "memory", "scale")


def test_any_bert_style_encoder_config():
    config = ScaleVAEConfig(encoder=RobertaConfig(pad_token_id=1).to_dict(), decoder=GPT2Config().to_dict())
    assert isinstance(config.encoder, RobertaConfig) and config.encoder.pad_token_id == 1


def test_paper_names_are_aliases():
    config = ScaleVAEConfig(des_std=0.8, f_epo=3, scale_schedule="epoch")
    assert config.scale_target_std == 0.8 and config.des_std == 0.8
    assert config.scale_freeze_epochs == 3 and config.f_epo == 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("latent_size", 0),
        ("latent_size", 2.5),
        ("latent_injection", "cross_attention"),
        ("collapse_strategy", "vamp"),
        ("kl_weight", -0.1),
        ("kl_weight", float("nan")),
        ("scale_target_std", 0.0),
        ("scale_momentum", 1.5),
        ("scale_min_std", -1.0),
        ("scale_schedule", "cosine"),
        ("scale_freeze_steps", 0),
        ("scale_freeze_epochs", -2),
        ("free_bits", -0.5),
        ("bn_gamma", 0.0),
        ("word_dropout", 0.95),
        ("word_dropout", -0.1),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ScaleVAEConfig(**{field: value})


def test_decoder_must_be_gpt2():
    with pytest.raises(ValueError, match="decoder"):
        ScaleVAEConfig(decoder=BertConfig().to_dict())


def test_newer_format_is_refused():
    with pytest.raises(ValueError, match="scalevae_format_version"):
        ScaleVAEConfig(scalevae_format_version=99)
