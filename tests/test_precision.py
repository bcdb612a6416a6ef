"""Mixed precision (issue: GPU scale): every strategy trains under autocast, the statistics stay in float32, and the
hot path reads nothing back from the device that it does not need. CPU bf16 autocast stands in for a GPU here."""

import torch

from tests.model_tester import strategies_and_injections, tester

tiny_model, random_batch = tester.get_model, tester.prepare_inputs


@strategies_and_injections()
def test_each_strategy_trains_under_bf16_autocast(strategy, injection):
    model = tiny_model(collapse_strategy=strategy, latent_injection=injection, dropout=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = random_batch(batch_size=8)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert out.loss.dtype == torch.float32 and out.kl.dtype == torch.float32
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():  # running estimates (scale factors, BN statistics, fitted prior)
            assert buffer.dtype in (torch.float32, torch.float64), name
    if strategy == "scale":
        assert model.collapse.epoch_batches.item() == 3
        assert not torch.allclose(model.collapse.scale_factors, torch.ones(4))


def test_generation_under_autocast_matches_float32_greedy_output():
    """bf16 rounds the logits, so outputs may differ where two tokens' logits are within bf16's resolution; on a tiny
    model with well-separated logits the greedy tokens are identical."""
    model = tiny_model(dropout=0.0).eval()
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(20)  # separate the logits far beyond bf16's 3 significant digits
    latents = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    reference = model.generate(latents=latents, max_new_tokens=12, do_sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.generate(latents=latents, max_new_tokens=12, do_sample=False)
    assert torch.equal(mixed, reference)


def test_schedule_state_is_read_from_python_not_the_device(monkeypatch):
    """A training step of Scale-VAE branches on Python ints: reading a buffer's value (`bool()`/`int()`/`.item()` of
    a tensor, each a device-to-host sync on a GPU) would fail here. (The mirrors are read once after the buffers are
    replaced, as loading does; the test replaces them by tensors whose values the mirrors already hold.)"""
    model = tiny_model(scale_freeze_steps=2).train()
    strategy = model.collapse
    for name in ("frozen", "steps", "epochs", "epoch_batches"):
        monkeypatch.setattr(strategy, name, _NoHostRead(getattr(strategy, name)), raising=False)
    strategy._mirrored = strategy._schedule_buffers()
    for _ in range(3):
        strategy.scale_factors_for(torch.randn(8, 4))
        strategy.end_step()
    assert strategy._frozen and strategy._steps == 3


class _NoHostRead(torch.Tensor):
    """A tensor whose value may be updated in place but never read back to Python."""

    @staticmethod
    def __new__(cls, tensor):
        return tensor.clone().as_subclass(cls)

    def __bool__(self):
        raise AssertionError("the hot path read a tensor's value (a host sync)")

    __int__ = __float__ = __index__ = __bool__

    def item(self):
        raise AssertionError("the hot path called .item() (a host sync)")


def test_latent_values_are_checked_once_per_generate_call(monkeypatch):
    import modeling_scalevae

    calls = []
    original = modeling_scalevae.check_latents
    monkeypatch.setattr(
        modeling_scalevae,
        "check_latents",
        lambda *args, **kwargs: calls.append(args[3] if len(args) > 3 else kwargs) or original(*args, **kwargs),
    )
    model = tiny_model().eval()
    model.generate(latents=torch.randn(2, 4), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert sum(bool(value) for value in calls) == 1 and len(calls) >= 6  # the value check at the first step only
    calls.clear()
    model.train()
    model(**random_batch())
    assert calls == [False]  # never in a training step
