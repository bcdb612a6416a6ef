"""One short training run of a tiny Scale-VAE or BN-VAE, on one process or several, for tests/test_scale_out.py.

Each rank writes OUTPUT/rankR.json: the logged losses, and the statistics every rank must agree on (scale factors,
BN-VAE's statistics, the fitted prior), both the running estimates at the end of training and the values after the
closing prior fit. Rank 0 saves the model to OUTPUT/final and the full state dict it saved to OUTPUT/state.pt.

    python tests/scale_out_run.py OUT --encoder TINY_BERT --batch_size 8                        # one process
    torchrun --nproc_per_node 2 tests/scale_out_run.py OUT --encoder TINY_BERT --batch_size 4   # Trainer, DDP
    torchrun --nproc_per_node 2 tests/scale_out_run.py OUT ... --deepspeed ds_config.json       # Trainer, DeepSpeed
    torchrun --nproc_per_node 2 tests/scale_out_run.py OUT ... --loop fsdp2                     # FSDP2 by hand
    accelerate launch --config_file examples/fsdp_accelerate.yaml tests/scale_out_run.py OUT ... --loop accelerate

`--loop trainer` trains with `scalevae.training.make_trainer` (DDP, `--fsdp`, `--deepspeed`); `--loop accelerate` with a
plain Accelerate loop (which takes FSDP from the launch config); `--loop fsdp2` shards the model with
`torch.distributed.fsdp.fully_shard` itself. Started without a launcher, each loop runs on one plain process.

The runs are deterministic, so that N processes can be compared with one: no dropout, and the decoder reads the
posterior mean (`sample_posterior=False`; each process draws its own noise, so a sampled z would differ from the
one-process run's for the same sentence). A process sees `--batch_size` sentences per step: the one-process run's
batches of N x that size, split.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalevae.data import DataCollatorForLatentLM  # noqa: E402
from tests.model_tester import tester  # noqa: E402


def deterministic(model):
    """No dropout (BERT's and GPT-2's attention read their nn.Dropout's p), and z = the posterior mean."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.register_forward_pre_hook(
        lambda _, args, kwargs: (args, {**kwargs, "sample_posterior": False}), with_kwargs=True
    )
    return model


def statistics(model) -> dict[str, list[float]]:
    values = {"prior_loc": model.fitted_prior.loc, "prior_scale": model.fitted_prior.scale}
    for name in ("scale_factors", "running_mean", "running_var"):
        if hasattr(model.collapse, name):
            values[name] = getattr(model.collapse, name)
    return {name: value.detach().cpu().double().tolist() for name, value in values.items()}


def prior_batches(data, collator):
    return [collator([data["train"][i] for i in range(s, s + 16)]) for s in range(0, 64, 16)]


def trainer_run(args, model, data, collator) -> dict:
    from transformers import TrainerCallback

    from scalevae.training import make_trainer

    extra = {}
    if args.fsdp:
        extra = dict(fsdp=True, fsdp_config={"version": 2})
    if args.deepspeed:
        extra = dict(deepspeed=args.deepspeed)
    training_args = tester.training_args(
        args.output / "trainer",
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        dataloader_drop_last=True,
        **extra,
    )
    trainer = make_trainer(model, training_args, data["train"], collator, prior_fit_sentences=64, probe_size=16)
    record = {}

    class BeforeThePriorFit(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            record["running"] = statistics(model)

    trainer.callback_handler.callbacks.insert(0, BeforeThePriorFit())
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # on every rank: a collective under sharding
    if trainer.accelerator.is_main_process:
        torch.save(state, args.output / "state.pt")
    trainer.save_model(str(args.output / "final"))  # the Trainer gathers the weights again (DeepSpeed, FSDP)
    record["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record["processes"] = trainer.accelerator.num_processes
    record["distributed_type"] = str(trainer.accelerator.distributed_type)
    return record


def accelerate_run(args, model, data, collator) -> dict:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    loader = DataLoader(data["train"], batch_size=args.batch_size, shuffle=False, collate_fn=collator, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    losses = []
    for step, batch in enumerate(loader):
        if step == args.max_steps:
            break
        out = model(**batch)
        accelerator.backward(out.loss)
        optimizer.step()
        unwrapped.collapse.end_step()
        optimizer.zero_grad()
        losses.append(accelerator.gather(out.loss.detach()).mean().item())
    record = {"running": statistics(unwrapped)}
    unwrapped.fit_prior(prior_batches(data, collator))  # every rank fits on the same sentences
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        torch.save(state, args.output / "state.pt")  # first: save_pretrained empties the dict it is given
        unwrapped.save_pretrained(str(args.output / "final"), state_dict=state)
    accelerator.wait_for_everyone()
    return record | {
        "losses": losses,
        "processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
    }


def fsdp2_run(args, model, data, collator) -> dict:
    """Each encoder and decoder block (the model's `_no_split_modules`), then the whole model, sharded across the
    processes with FSDP2; a block's parameters are all-gathered for its forward and backward only."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    distributed = "RANK" in os.environ
    rank, world = 0, 1
    if distributed:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        for module in model.modules():
            if type(module).__name__ in model._no_split_modules:
                fully_shard(module)
        fully_shard(model)
    loader = DataLoader(data["train"], batch_size=args.batch_size * world, shuffle=False, collate_fn=collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    losses = []
    for step, batch in enumerate(loader):
        if step == args.max_steps:
            break
        batch = {key: value.chunk(world)[rank] for key, value in batch.items()}  # this process's share
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        model.collapse.end_step()
        optimizer.zero_grad()
        loss = out.loss.detach().clone()
        if distributed:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    record = {"running": statistics(model), "losses": losses, "processes": world, "distributed_type": "FSDP2"}
    if not distributed:
        model.fit_prior(prior_batches(data, collator))
        torch.save(model.state_dict(), args.output / "state.pt")
        model.save_pretrained(str(args.output / "final"))
        return record
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.fit_prior(prior_batches(data, collator))  # every rank fits on the same sentences
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(state, args.output / "state.pt")  # first: save_pretrained empties the dict it is given
        model.save_pretrained(str(args.output / "final"), state_dict=state)
    dist.barrier()
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--encoder", required=True, help="a tiny encoder folder (tests: tiny_encoder_path)")
    parser.add_argument("--strategy", default="scale")
    parser.add_argument("--batch_size", type=int, default=8, help="per process")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--loop", choices=("trainer", "accelerate", "fsdp2"), default="trainer")
    parser.add_argument("--fsdp", action="store_true", help="Trainer: fsdp=True, FSDP2")
    parser.add_argument("--deepspeed", default=None, help="Trainer: a DeepSpeed config file")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    model, encoder_tokenizer, decoder_tokenizer, data, _ = tester.get_trainer_setup(
        args.encoder, strategy=args.strategy
    )
    collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    run = {"trainer": trainer_run, "accelerate": accelerate_run, "fsdp2": fsdp2_run}[args.loop]
    record = run(args, deterministic(model), data, collator)
    record["final"] = statistics(model)
    (args.output / f"rank{int(os.environ.get('RANK', 0))}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
