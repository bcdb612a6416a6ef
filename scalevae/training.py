"""Training glue for the stock `transformers.Trainer`: the KL-weight schedule, the collapse strategy's step and epoch
hooks, the prior fit at the end, and the latent statistics logged beside the loss (console, TensorBoard,
`trainer.state.log_history`).

The basic path needs none of it: `Trainer(model=model, args=args, train_dataset=..., data_collator=...)` trains (its
`eval_loss` is scored at the posterior's mode, the model's eval-mode default; `LatentLMTrainer` samples z as training
does).
"""

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from loading_scalevae import recording_tokenizers

from .card import checkpoint_config_differences, training_record
from .data import texts_fingerprint
from .hub import removed_if_incomplete
from .metrics import PosteriorAccumulator
from .options import KL_SCHEDULES

logger = logging.get_logger(__name__)


@dataclass
class KLSchedule:
    """β as a function of the training step.

    - `constant`: `max_weight` throughout.
    - `linear`: 0 → `max_weight` over the first `warmup_steps` steps (Bowman et al. 2016), then constant.
    - `cyclical`: Fu et al. 2019: `n_cycle` cycles over `total_steps`; in each, β is 0 for the first `ratio_zero` of the
      cycle, rises linearly to `max_weight` over the next `ratio_increase`, then stays there. `total_steps=0` means
      the run's length: `KLScheduleCallback` reads it from the Trainer when training begins.
    """

    schedule: str = "constant"
    max_weight: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 0
    n_cycle: int = 4
    ratio_zero: float = 0.25
    ratio_increase: float = 0.25

    def __post_init__(self):
        if self.schedule not in KL_SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {KL_SCHEDULES}.")
        if not (self.ratio_zero >= 0 and self.ratio_increase > 0 and self.ratio_zero + self.ratio_increase <= 1):
            raise ValueError(
                f"ratio_zero={self.ratio_zero} and ratio_increase={self.ratio_increase} must be >= 0, > 0 and sum "
                "to at most 1."
            )
        if self.schedule == "cyclical" and (self.total_steps < 0 or self.n_cycle < 1):
            raise ValueError(f"the cyclical schedule needs total_steps >= 0 and n_cycle >= 1, got {self}.")

    def __call__(self, step: int) -> float:
        if self.schedule == "linear" and self.warmup_steps > 0:
            return self.max_weight * min(1.0, step / self.warmup_steps)
        if self.schedule == "cyclical":
            if self.total_steps < 1:
                raise ValueError("the cyclical schedule's total_steps is unset: give it, or train with the callback.")
            period = self.total_steps / self.n_cycle
            position = (step % period) / period
            rise = (position - self.ratio_zero) / self.ratio_increase
            return self.max_weight * min(1.0, max(0.0, rise))
        return self.max_weight


class KLScheduleCallback(TrainerCallback):
    """Passes β = schedule(global step) to every training forward as `kl_weight=` (a forward pre-hook on the model)
    and logs it; the model's config keeps its own `kl_weight`, so a saved config never records a schedule's passing
    value. The global step is checkpointed by the Trainer, so a resumed run continues the schedule where it stopped.
    Evaluation passes (the Trainer's `eval_loss`, the latent monitor) use `config.kl_weight`.

    It logs before the reporting callbacks (TensorBoard, console) only if it runs first: `make_trainer` puts it there.
    """

    def __init__(self, schedule: KLSchedule):
        self.schedule = schedule
        self.kl_weight: float | None = None  # set before every step
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.schedule.total_steps == 0:  # the run's real length, epochs included, known once training begins
            self.schedule = replace(self.schedule, total_steps=state.max_steps)
        if self._hook is None:
            self._hook = _unwrap(model).register_forward_pre_hook(self._pass_kl_weight, with_kwargs=True)

    def _pass_kl_weight(self, module, args, kwargs):
        if module.training and self.kl_weight is not None and kwargs.get("kl_weight") is None:
            return args, {**kwargs, "kl_weight": self.kl_weight}
        return None

    def on_step_begin(self, args, state, control, **kwargs):
        self.kl_weight = self.schedule(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.kl_weight is not None:
            logs["kl_weight"] = self.kl_weight
            if state.log_history:
                state.log_history[-1]["kl_weight"] = self.kl_weight

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class CollapseScheduleCallback(TrainerCallback):
    """Tells the collapse strategy when an optimizer step and an epoch end (Scale-VAE's factors freeze after
    `scale_freeze_steps` optimizer steps or `f_epo` epochs)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _unwrap(model).collapse.end_step()

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        _unwrap(model).collapse.end_epoch()


class FitPriorCallback(TrainerCallback):
    """At the end of training, fits the generative model's statistics exactly (`ScaleVAEForLatentLM.fit_prior`: BN-VAE's
    population statistics, then the fitted prior) on up to `num_sentences` training sentences, so the saved model
    samples and scores with the prior of the model it is, not a running average of earlier ones."""

    def __init__(self, train_dataset, data_collator, num_sentences: int = 4000, batch_size: int = 128):
        self.dataset, self.collator = train_dataset, data_collator
        self.num_sentences, self.batch_size = num_sentences, batch_size

    def on_train_end(self, args, state, control, model=None, **kwargs):
        _unwrap(model).fit_prior(prior_fit_batches(self.dataset, self.collator, self.num_sentences, self.batch_size))


def prior_fit_batches(train_dataset, data_collator, num_sentences: int = 4000, batch_size: int = 128):
    """The batches `fit_prior` fits on: the first `num_sentences` training sentences (the same on every process)."""
    from torch.utils.data import DataLoader

    sample = train_dataset.select(range(min(num_sentences, len(train_dataset))))
    return DataLoader(sample, batch_size=batch_size, collate_fn=data_collator)


@torch.no_grad()
def fit_prior_families(model, batches, families, seed: int = 0) -> dict:
    """family -> that prior (float64 `torch.distributions`) fitted to the model's aggregate posterior on `batches`
    (`prior_fit_batches`: the sentences its own prior was fitted on), without changing the model: families it does not
    hold ("full", "mixture") scored beside its own in one `evaluate_model` pass, instead of on refitted copies."""
    from configuration_scalevae import ScaleVAEConfig
    from modeling_scalevae import FittedPrior

    was_training = model.training
    model.eval()
    try:
        posteriors = [
            model.encode(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
            for batch in batches
        ]
    finally:
        model.train(was_training)
    decoder_mu = torch.cat([p.decoder_mu for p in posteriors]).float()
    logvar = torch.cat([p.logvar for p in posteriors]).float()
    fitted = {}
    for family in families:
        config = ScaleVAEConfig.from_dict(model.config.to_dict())
        config.prior = family
        prior = FittedPrior(config).to(decoder_mu.device)
        prior.fit(decoder_mu, logvar, torch.Generator().manual_seed(seed))  # the mixture's EM draws are seeded
        fitted[family] = prior.distribution(family, dtype=torch.float64)
    return fitted


class LatentMonitorCallback(TrainerCallback):
    """At every logging step, measures the latent on a fixed probe set and adds it to the logged values:
    reconstruction loss and KL (paper's and bound's), mutual information and active units on the encoder's posterior
    and on the decoder's latent, and the scale factors' range.

    It must run before the reporting callbacks (TensorBoard, console) so they see the values: `attach` does that.
    """

    def __init__(self, probe_batches: list[dict[str, torch.Tensor]]):
        self.probe_batches = probe_batches

    @classmethod
    def attach(cls, trainer: Trainer, probe_batches: list[dict[str, torch.Tensor]]) -> "LatentMonitorCallback":
        callback = cls(probe_batches)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:
            return
        stats = latent_statistics(_unwrap(model), self.probe_batches)
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)


@torch.no_grad()
def latent_statistics(model, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Cheap latent health figures on a few batches, from the training forward in eval mode (one sampled z, asked for
    with `sample_posterior=True` since eval mode decodes the mode; no importance sampling; see
    `metrics.evaluate_model` for the full evaluation)."""
    accumulated = PosteriorAccumulator()
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model(**batch, sample_posterior=True)
            n = batch["labels"].shape[0]
            accumulated.add(
                out,
                batch["labels"],
                reconstruction_loss=out.reconstruction_loss * n,
                kl=out.kl * n,
                decoder_kl=out.decoder_kl * n,
            )
    finally:
        model.train(was_training)
    _, factors = model.prior_parameters("scaled")  # the scale factors f (ones but for Scale-VAE)
    return {
        **accumulated.summary(),
        "scale_factor_min": factors.min().item(),
        "scale_factor_max": factors.max().item(),
    }


class CompleteCheckpointCallback(TrainerCallback):
    """Makes every Trainer checkpoint a complete saved folder: beside the model (whose weights carry their checksum)
    and the optimizer state, both tokenizers and a model card, so `LatentText.from_pretrained("…/checkpoint-N")`
    loads it like a `save_model` folder."""

    def __init__(self, encoder_tokenizer, decoder_tokenizer, training: dict | None = None):
        self.encoder_tokenizer, self.decoder_tokenizer = encoder_tokenizer, decoder_tokenizer
        self.training = dict(training or {})

    def on_save(self, args, state, control, model=None, **kwargs):
        from .card import write_model_card
        from .factory import save_tokenizers

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not args.should_save or not os.path.isdir(folder):
            return
        with removed_if_incomplete(folder):
            save_tokenizers(folder, self.encoder_tokenizer, self.decoder_tokenizer)
            if model is not None:
                write_model_card(folder, _unwrap(model), training={**self.training, "steps": state.global_step})
            if "data_sha256" in self.training:  # what a resume checks its data against (`check_resume_data`)
                with open(os.path.join(folder, DATA_FINGERPRINT), "w", encoding="utf-8") as handle:
                    json.dump(
                        {key: self.training.get(key) for key in ("data", "data_sha256", "training_sentences")}, handle
                    )
            mark_complete(folder, state.global_step)


# -- a resume trains on the data of its checkpoint -----------------------------------------------------------------------

DATA_FINGERPRINT = "data_fingerprint.json"


def check_resume_data(checkpoint: str, texts, source: str) -> None:
    """Refuse to resume `checkpoint` on other training texts than those it was trained on (a checkpoint saved before
    they were recorded says nothing), naming both."""
    path = os.path.join(str(checkpoint), DATA_FINGERPRINT)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        try:
            recorded = json.load(handle)
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): the checkpoint is corrupted.") from None
    now = texts_fingerprint(texts)
    if recorded.get("data_sha256") != now:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained on other data than {source}: "
            f"{recorded.get('training_sentences')} sentences of {recorded.get('data')} (sha256 "
            f"{str(recorded.get('data_sha256'))[:12]}) then, {len(texts)} sentences (sha256 {now[:12]}) now. Resume "
            f"with the data it was trained on, or fine-tune it on the new data: --model_name_or_path {checkpoint}."
        )


# -- a checkpoint is complete or invisible ------------------------------------------------------------------------------
# The Trainer writes a checkpoint file by file (weights, optimizer, scheduler, RNG state, trainer_state.json, then our
# tokenizers and card): a kill in between leaves a folder with the name of a checkpoint and half its contents. The last
# file written is a marker; a checkpoint without it is incomplete, and resuming skips it (naming it) or refuses it.

COMPLETE_MARKER = "checkpoint_complete.json"


def mark_complete(folder: str, step: int) -> None:
    """Write the marker, atomically, as the checkpoint's last file."""
    partial = os.path.join(folder, f".{COMPLETE_MARKER}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump({"global_step": step}, handle)
    os.replace(partial, os.path.join(folder, COMPLETE_MARKER))


def is_complete_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER)) and os.path.isfile(
        os.path.join(folder, "trainer_state.json")
    )


def checkpoints_in(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of a run, by step."""
    import re

    if not os.path.isdir(output_dir):
        return []
    steps = {
        int(match.group(1)): os.path.join(output_dir, name)
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))
        and os.path.isdir(os.path.join(output_dir, name))
    }
    return [steps[step] for step in sorted(steps)]


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The run's newest complete checkpoint; newer incomplete ones are named in a warning. None: no checkpoint at all
    (a ValueError naming them when every checkpoint is incomplete)."""
    checkpoints = checkpoints_in(output_dir)
    complete = [folder for folder in checkpoints if is_complete_checkpoint(folder)]
    newest = checkpoints.index(complete[-1]) if complete else -1
    skipped = checkpoints[newest + 1 :]  # by step: checkpoint-10 is newer than checkpoint-9
    if checkpoints and not complete:
        raise ValueError(
            f"no complete checkpoint in {output_dir} to resume from: {', '.join(checkpoints)} lack {COMPLETE_MARKER} "
            "(the run was killed while writing them). Start the run again without --resume_from_checkpoint."
        )
    if skipped:
        logger.warning(
            "Skipping incomplete checkpoint(s) %s (no %s: killed while being written); resuming from %s.",
            ", ".join(skipped),
            COMPLETE_MARKER,
            complete[-1],
        )
    return complete[-1] if complete else None


def check_checkpoint_complete(checkpoint: str) -> None:
    """Refuse to resume from an incomplete checkpoint, naming what it lacks and the newest complete one."""
    if not os.path.isdir(checkpoint) or is_complete_checkpoint(checkpoint):
        return
    lacks = [
        name for name in ("trainer_state.json", COMPLETE_MARKER) if not os.path.isfile(os.path.join(checkpoint, name))
    ]
    try:
        newest = newest_complete_checkpoint(os.path.dirname(os.path.abspath(checkpoint)))
    except ValueError:
        newest = None
    instead = f" Resume from {newest}, the newest complete one." if newest else ""
    raise ValueError(
        f"resume_from_checkpoint {checkpoint} is incomplete: it lacks {' and '.join(lacks)} (the run was killed while "
        f"writing it).{instead}"
    )


# What a Trainer checkpoint needs beyond the weights to continue exactly where it stopped, and what resuming without
# it changes. (The Trainer loads the optimizer only together with the scheduler.)
RESUME_STATE = {
    "optimizer.pt": "the optimizer's state (AdamW's moment estimates) starts from zero, so the next steps move the "
    "weights differently",
    "scheduler.pt": "the learning-rate schedule restarts from its first step (warm-up and decay begin again), and the "
    "Trainer then does not load optimizer.pt either",
    "rng_state.pth": "the random state is not restored: dropout masks and the latent's sampling noise differ",
}


def check_resume_checkpoint(checkpoint: str, args) -> None:
    """Before the Trainer resumes from `checkpoint`: verify its weights against the checksums recorded at their save
    (the Trainer's own resume reads them unchecked, and a flipped bit would be trained on and saved under a fresh
    checksum), naming a corrupted or truncated file; warn, naming each, when state that an exact continuation needs
    is missing, and what resuming without it changes."""
    from loading_scalevae import verify_weights_checksums, weights_files_in

    if not os.path.isdir(checkpoint):
        return  # the Trainer says it is not a checkpoint
    try:
        verify_weights_checksums(weights_files_in(checkpoint), remedy="Resume from another checkpoint.")
    except OSError as error:
        raise OSError(f"resume_from_checkpoint {checkpoint}: {error}") from error
    if getattr(args, "deepspeed", None):
        return  # DeepSpeed keeps its own optimizer and RNG files
    needed = dict(RESUME_STATE)
    if args.world_size > 1:
        needed[f"rng_state_{args.process_index}.pth"] = needed.pop("rng_state.pth")
    if args.fp16:
        needed["scaler.pt"] = "the loss scale of mixed precision restarts from its initial value"
    missing = [
        f"{name} ({effect})" for name, effect in needed.items() if not os.path.isfile(os.path.join(checkpoint, name))
    ]
    if missing:
        logger.warning(
            "Resuming from %s without %s. The run continues, but it will not reproduce the uninterrupted run.",
            checkpoint,
            "; without ".join(missing),
        )


class LatentLMTrainer(Trainer):
    """The stock `Trainer`, except that its evaluation forward samples z (`sample_posterior=True`) as training does:
    `eval_loss` is then the single-sample estimate of the training objective (the negative ELBO at `config.kl_weight`),
    comparable with the training loss. (Eval mode alone decodes the posterior's mode, which scores lower.)"""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if not model.training:
            inputs = {**inputs, "sample_posterior": True}
        return super().compute_loss(model, inputs, *args, **kwargs)


class ScaleVAETrainer(LatentLMTrainer):
    """`LatentLMTrainer` with the guards a training run's folder needs (`make_trainer` builds one):

    - the output folder is not the folder the model was loaded from, nor holds it or lies inside it;
    - a resume verifies the checkpoint's weights and says what state it lacks (`check_resume_checkpoint`);
    - one run per output folder: `train` holds the folder's lock (`scalevae.hub.writer_lock`), so a second run, or a
      `save_model`, on the same folder fails at once instead of corrupting the checkpoints;
    - a checkpoint whose writing fails is removed (a full disk is reported as such, naming it);
    - training_args.bin, which holds the access token among the arguments, is readable by its owner only (0600).
    """

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        from .hub import writer_lock
        from .options import check_output_folder

        # A fine-tuned model's own folder must survive its run: checkpoints, final/ and their rotation would land on it.
        check_output_folder(self.args.output_dir, getattr(_unwrap(self.model), "name_or_path", None) or None)
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = newest_complete_checkpoint(self.args.output_dir)
            resume_from_checkpoint = checkpoint or True  # None: the Trainer raises its own error
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = str(checkpoint)
            check_checkpoint_complete(checkpoint)
            check_resume_checkpoint(checkpoint, self.args)
        lock = writer_lock(self.args.output_dir, "train") if self.args.should_save else contextlib.nullcontext()
        with lock:
            if isinstance(checkpoint, str) and self._finished_at(checkpoint):
                return self._finish_from(checkpoint)
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _finished_at(self, checkpoint: str) -> bool:
        """Whether the checkpoint holds the run's last step (the run was killed after it, during the prior fit,
        the evaluation or the final save)."""
        from transformers import TrainerState

        state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        target = self.args.max_steps if self.args.max_steps > 0 else state.max_steps
        return target > 0 and state.global_step >= target

    def _finish_from(self, checkpoint: str):
        """A run whose last checkpoint is at max_steps: no step runs (the Trainer would run one more); the checkpoint's
        weights and state are loaded and training ends there, with what ends every run (the epoch's end, the prior
        fit): the weights are those of the uninterrupted run."""
        from transformers import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        # what the Trainer's loop does after its last step: the epoch ends (Scale-VAE's end_epoch; a checkpoint saved
        # per epoch was saved after it), then training
        if self.args.save_strategy != "epoch":
            self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        losses = [entry["train_loss"] for entry in self.state.log_history if "train_loss" in entry]
        losses = losses or [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        return TrainOutput(self.state.global_step, losses[-1] if losses else float("nan"), {})

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with removed_if_incomplete(folder) if self.args.should_save else contextlib.nullcontext():
            super()._save_checkpoint(model, trial)
            _owner_only(os.path.join(folder, "training_args.bin"))
            completes = any(isinstance(cb, CompleteCheckpointCallback) for cb in self.callback_handler.callbacks)
            if self.args.should_save and not completes:  # else its on_save writes the marker after the tokenizers
                mark_complete(folder, self.state.global_step)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        args_file = os.path.join(output_dir, "training_args.bin")
        if self.args.should_save:  # created 0600 before torch.save writes into it: never readable by others
            os.makedirs(output_dir, exist_ok=True)
            os.close(os.open(args_file, os.O_WRONLY | os.O_CREAT, 0o600))
            _owner_only(args_file)
        collator = self.data_collator
        tokenizers = [getattr(collator, f"{part}_tokenizer", None) for part in ("encoder", "decoder")]
        # the checkpoint's tokenizers (CompleteCheckpointCallback) are tied to its weights, as in a save_model folder
        recording = recording_tokenizers(*tokenizers) if None not in tokenizers else contextlib.nullcontext()
        with recording:
            super()._save(output_dir, state_dict)
        _owner_only(args_file)


def _owner_only(path: str) -> None:
    if os.path.isfile(path):
        os.chmod(path, 0o600)


def make_trainer(
    model,
    args,
    train_dataset,
    data_collator,
    eval_dataset=None,
    kl_schedule: KLSchedule | None = None,
    probe_size: int = 256,
    prior_fit_sentences: int = 4000,
    **trainer_kwargs,
) -> Trainer:
    """A `ScaleVAETrainer` (a `LatentLMTrainer`, whose `eval_loss` comes from sampled z, with its resume verified and
    its folder locked) with the KL schedule, the collapse strategy's step and epoch hooks, the prior fit at the end of
    training and the latent monitor attached; with a
    `DataCollatorForLatentLM`, every checkpoint also gets both tokenizers and a model card (`training`: the card's
    training record, see `scalevae.card.render_model_card`)."""
    training = trainer_kwargs.pop("training", None)
    callbacks = [CollapseScheduleCallback(), FitPriorCallback(train_dataset, data_collator, prior_fit_sentences)]
    encoder_tokenizer = getattr(data_collator, "encoder_tokenizer", None)
    decoder_tokenizer = getattr(data_collator, "decoder_tokenizer", None)
    if encoder_tokenizer is not None and decoder_tokenizer is not None:
        callbacks.append(CompleteCheckpointCallback(encoder_tokenizer, decoder_tokenizer, training))
    trainer = ScaleVAETrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    if kl_schedule is not None:  # first, so the reporting callbacks see the β it logs
        trainer.callback_handler.callbacks.insert(0, KLScheduleCallback(kl_schedule))
    probe_source = eval_dataset if eval_dataset is not None else train_dataset
    if len(probe_source) < 2 and probe_source is not train_dataset and len(train_dataset) >= 2:
        logger.warning("The validation set has one sentence; the latent monitor probes the training set instead.")
        probe_source = train_dataset
    if len(probe_source) < 2:  # MI and active units are spreads across sentences
        logger.warning("The latent monitor is off: it needs at least two sentences (found %d).", len(probe_source))
        return trainer
    probe = probe_source.select(range(min(probe_size, len(probe_source))))
    batch_size = args.per_device_eval_batch_size
    probe_batches = [
        data_collator([probe[i] for i in range(s, min(s + batch_size, len(probe)))])
        for s in range(0, len(probe), batch_size)
    ]
    LatentMonitorCallback.attach(trainer, probe_batches)
    return trainer


def _unwrap(model):
    """The ScaleVAE model inside DDP / Accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


# ---------------------------------------------------------------------------------------------------------------------
# The run recipe's training step
# ---------------------------------------------------------------------------------------------------------------------


class TimeBudgetCallback(TrainerCallback):
    """The training phase's one progress bar (in seconds under a wall-clock budget, else in steps, with the loss), and
    the budget: training stops when the next `stop_every` steps would overrun `seconds`.

    Training stops only at multiples of `stop_every` (the logging interval), projecting the next interval from the
    last one (so a machine that slows down mid-run still stops near the budget): a run that printed N steps is
    reproduced exactly by `--max_steps N` under a schedule that does not depend on the total (constant learning rate).
    """

    def __init__(self, seconds: float | None, stop_every: int, desc: str = "train"):
        self.seconds, self.stop_every, self.desc = seconds, stop_every, desc
        self.bar, self.start, self.last_check, self.loss = None, 0.0, 0.0, None
        self.elapsed = 0.0  # seconds from the first step's start to the last step's end

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_check = time.perf_counter()
        unit = "s" if self.seconds else "step"
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}{postfix}]"
        self.bar = tqdm(
            total=round(self.seconds) if self.seconds else state.max_steps,
            initial=0 if self.seconds else state.global_step,
            desc=self.desc,
            unit=unit,
            dynamic_ncols=True,
            bar_format=bar_format,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.elapsed = now - self.start
        if self.bar is not None:
            self.bar.n = min(self.elapsed, self.bar.total) if self.seconds else state.global_step
            postfix = f"step {state.global_step}" if self.seconds else ""
            if self.loss is not None:
                postfix += f"{', ' if postfix else ''}loss {self.loss:.1f}"
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()
        if self.seconds and state.global_step % self.stop_every == 0:
            interval = now - self.last_check
            self.last_check = now
            if self.elapsed + interval > self.seconds:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()


def train(spec, data, model, callbacks=(), desc: str = "train"):
    """The run recipe's training step (`spec`: a `scalevae.recipe.RunSpec`, `data`: a `scalevae.data.RunData`): the
    stock Trainer with the recipe's glue (`make_trainer`: KL schedule, the strategy's `end_step`/`end_epoch`,
    the prior fit at the end, the latent monitor, complete checkpoints). Returns the trainer and the seconds trained."""
    args = spec.training
    if args.dataloader_pin_memory and not torch.cuda.is_available():  # nothing to pin to: spare the warning
        args = dataclasses.replace(args, dataloader_pin_memory=False)
    if args.resume_from_checkpoint:
        differences = checkpoint_config_differences(model.config, args.resume_from_checkpoint)
        if differences:
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} was trained with another model: "
                + "; ".join(differences)
                + ". Resume with the options the checkpoint was trained with."
            )
        check_resume_data(args.resume_from_checkpoint, data.texts["train"], training_record(spec, data)["data"])
    schedule = KLSchedule(
        spec.model.kl_schedule,
        model.config.kl_weight,  # a fine-tuned model's saved β unless --kl_weight is given
        spec.model.kl_warmup_steps or 0,
        args.max_steps if args.max_steps > 0 else 0,
        spec.model.kl_n_cycle,
        spec.model.kl_ratio_zero,
        spec.model.kl_ratio_increase,
    )
    trainer = make_trainer(
        model,
        args,
        data.dataset["train"],
        data.collator,
        eval_dataset=data.dataset.get("validation"),
        kl_schedule=schedule,
        prior_fit_sentences=spec.run.prior_fit_sentences,
        processing_class=data.encoder_tokenizer,
        training=training_record(spec, data),
    )
    # The recipe's bar shows the phase; the full logs go to TensorBoard and `trainer.state.log_history`.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    budget = TimeBudgetCallback(
        spec.run.train_minutes * 60 if spec.run.train_minutes is not None else None, args.logging_steps, desc
    )
    trainer.add_callback(budget)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer, budget.elapsed
