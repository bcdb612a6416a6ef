"""Train a Scale-VAE with a plain Accelerate loop.

Runs unchanged on one CPU or GPU, and on several processes:
    python examples/train_accelerate.py --max_steps 400
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py   # 2 CPU processes (gloo) or GPUs
    torchrun --nproc_per_node 2 examples/train_accelerate.py
(on a CPU-only machine, plain `accelerate launch --num_processes 2` starts only one process: add --multi_gpu.)

Under several processes each rank sees its share of the batch; Scale-VAE all-reduces the sums of mu and mu² so the
scale factors are those of the global batch, identical on every rank.
"""

import json
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from scalevae.hub import save_model
from scalevae.recipe import RunSpec, build_or_load, prepare_data, quiet
from scalevae.training import KLSchedule, latent_statistics, prior_fit_batches

# The example's preset of the run recipe's options (`scalevae train --help` lists them all).
PRESET = dict(
    output_dir="outputs/accelerate",
    max_steps=400,
    per_device_train_batch_size=32,
    learning_rate=5e-4,
    max_length=32,
    logging_steps=50,
    seed=0,
    latent_size=32,
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)


def main(argv=None):
    # Without a GPU, Accelerate forms a multi-process group (gloo) only when told it runs on the CPU (TrainingArguments
    # sets up the process state when parsed: use_cpu tells it, and the Accelerator then shares that state).
    spec, _, _ = RunSpec.parse(sys.argv[1:] if argv is None else argv, PRESET, prog="train_accelerate.py")
    args = spec.training
    accelerator = Accelerator(cpu=args.use_cpu)
    with accelerator.main_process_first(), quiet():  # rank 0 fits the tokenizer and tokenises; the others follow
        data = prepare_data(spec)
    model = build_or_load(spec, data)  # seeded: every rank starts from the same weights
    train, validation = data.dataset["train"], data.dataset.get("validation", data.dataset["train"])
    loader = DataLoader(
        train, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=data.collator, drop_last=True
    )
    probe = [
        data.collator([validation[i] for i in range(s, min(s + 64, 256, len(validation)))])
        for s in range(0, min(256, len(validation)), 64)
    ]
    # The Trainer's defaults (AdamW without weight decay, linear decay after a 5% warm-up), so both paths compare.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, args.max_steps // 20), args.max_steps)
    # The scheduler stays unprepared: Accelerate's wrapper would step it once per process, per step.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    schedule = KLSchedule(
        spec.model.kl_schedule,
        unwrapped.config.kl_weight,
        spec.model.kl_warmup_steps,
        args.max_steps,
        spec.model.kl_n_cycle,
        spec.model.kl_ratio_zero,
        spec.model.kl_ratio_increase,
    )

    step, history = 0, []
    progress = tqdm(total=args.max_steps, disable=not accelerator.is_main_process, desc="training")
    while step < args.max_steps:
        for batch in loader:
            out = model(**batch, kl_weight=schedule(step))
            accelerator.backward(out.loss)
            optimizer.step()
            unwrapped.collapse.end_step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            progress.update()
            if step % args.logging_steps == 0 or step == args.max_steps:
                record = {"step": step, "loss": accelerator.gather(out.loss.detach()).mean().item()}
                # Every rank runs the probe: under FSDP its forward gathers the sharded weights, a collective.
                record |= latent_statistics(unwrapped, probe)
                if accelerator.is_main_process:
                    progress.write(json.dumps({k: round(v, 4) for k, v in record.items()}))
                    history.append(record)
            if step >= args.max_steps:
                break
        unwrapped.collapse.end_epoch()
    progress.close()

    # As the Trainer path does when training ends: fit BN-VAE's statistics and the prior on a training sample. Every
    # rank fits on the same sentences, so every rank holds the same prior (and under FSDP the forward is collective).
    unwrapped.fit_prior(prior_fit_batches(train, data.collator, spec.run.prior_fit_sentences))
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # every rank: under FSDP it gathers the shards (a collective)
    if accelerator.is_main_process:
        output = spec.output_dir
        recipe = dict(
            data=spec.data.train_file or "embedded default corpus",
            steps=step,
            processes=accelerator.num_processes,
            batch_size_per_process=args.per_device_train_batch_size,
            command=" ".join(["examples/train_accelerate.py", *(sys.argv[1:] if argv is None else argv)]),
        )
        save_model(
            output / "final",
            unwrapped,
            data.encoder_tokenizer,
            data.decoder_tokenizer,
            training=recipe,
            state_dict=state_dict,
        )
        (output / "history.json").write_text(json.dumps(history, indent=2))
        accelerator.print(f"saved {output / 'final'}")


if __name__ == "__main__":
    main()
