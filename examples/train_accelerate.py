"""Train a Scale-VAE with a plain Accelerate loop.

Runs unchanged on one CPU or GPU, and on several processes:
    python examples/train_accelerate.py --max_steps 400
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py   # 2 CPU processes (gloo) or GPUs
    torchrun --nproc_per_node 2 examples/train_accelerate.py
(on a CPU-only machine, plain `accelerate launch --num_processes 2` starts only one process: add --multi_gpu.)

Under several processes each rank sees its share of the batch; Scale-VAE all-reduces the sums of mu and mu² so the
scale factors are those of the global batch, identical on every rank.
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from configuration_scalevae import COLLAPSE_STRATEGIES
from scalevae.data import DataCollatorForLatentLM, load_text_dataset, tokenize_dataset
from scalevae.factory import build_model
from scalevae.hub import save_model
from scalevae.training import KL_SCHEDULES, KLSchedule, latent_statistics


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_file", default=None, help="one sentence per line (default: the embedded corpus)")
    parser.add_argument("--validation_file", default=None)
    parser.add_argument("--encoder", default=None, help="BERT-style encoder path or Hub id (default: offline MiniLM)")
    parser.add_argument("--decoder", default=None, help="GPT-2 path or Hub id (default: a new small GPT-2)")
    parser.add_argument("--decoder_layers", type=int, default=4)
    parser.add_argument("--decoder_width", type=int, default=256)
    parser.add_argument("--collapse_strategy", default="scale", choices=COLLAPSE_STRATEGIES)
    parser.add_argument("--latent_size", type=int, default=32)
    parser.add_argument("--des_std", type=float, default=1.0)
    parser.add_argument("--kl_schedule", default="constant", choices=KL_SCHEDULES)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=32, help="per process")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/accelerate")
    return parser.parse_args()


def main():
    args = parse_args()
    # Without a GPU, Accelerate forms a multi-process group (gloo) only when told it runs on the CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    model, encoder_tokenizer, decoder_tokenizer = build_model(
        args.encoder,
        args.decoder,
        latent_size=args.latent_size,
        collapse_strategy=args.collapse_strategy,
        scale_target_std=args.des_std,
        decoder_config_overrides=dict(n_layer=args.decoder_layers, n_embd=args.decoder_width),
    )
    files = (
        {"train": args.train_file, "validation": args.validation_file or args.train_file} if args.train_file else None
    )
    with accelerator.main_process_first():  # rank 0 tokenises, the others read the datasets cache
        dataset, _ = tokenize_dataset(load_text_dataset(files), encoder_tokenizer, decoder_tokenizer, args.max_length)
    collator = DataCollatorForLatentLM(encoder_tokenizer, decoder_tokenizer)
    loader = DataLoader(
        dataset["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collator, drop_last=True
    )
    probe = [
        collator([dataset["validation"][i] for i in range(s, min(s + 64, 256, len(dataset["validation"])))])
        for s in range(0, min(256, len(dataset["validation"])), 64)
    ]
    # The Trainer's defaults (AdamW without weight decay, linear decay after a 5% warm-up), so both paths compare.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, args.max_steps // 20), args.max_steps)
    # The scheduler stays unprepared: Accelerate's wrapper would step it once per process, per step.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    schedule = KLSchedule(args.kl_schedule, warmup_steps=args.max_steps // 2, total_steps=args.max_steps)

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
                if accelerator.is_main_process:
                    record |= latent_statistics(unwrapped, probe)
                    progress.write(json.dumps({k: round(v, 4) for k, v in record.items()}))
                    history.append(record)
            if step >= args.max_steps:
                break
        unwrapped.collapse.end_epoch()
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(args.output_dir)
        recipe = dict(
            data=args.train_file or "embedded default corpus",
            steps=step,
            processes=accelerator.num_processes,
            batch_size_per_process=args.batch_size,
            command="examples/train_accelerate.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        )
        save_model(output / "model", unwrapped, encoder_tokenizer, decoder_tokenizer, training=recipe)
        (output / "history.json").write_text(json.dumps(history, indent=2))
        accelerator.print(f"saved {output / 'model'}")


if __name__ == "__main__":
    main()
