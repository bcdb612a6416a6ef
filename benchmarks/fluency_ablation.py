"""Why Scale-VAE's text stutters as des_std grows: one change at a time on the `yelp-cpu` preset (issue 27).

    python benchmarks/fluency_ablation.py --output_dir outputs/fluency-ablation [--variants scale_1 bn ...] [--seed 0]

Every variant is a run of `scalevae compare --preset yelp-cpu` (same data, reference language model, text classifier,
steps and seed) with one thing changed, evaluated on the test split as the comparison does (IW-NLL, consistency,
nucleus-sampled generation, edits). The variants that change no weights (decoding, the prior the samples come from,
decoding from the posterior mean or from a posterior sample) reuse the trained model of their base variant. Each
finished variant is written to OUTPUT_DIR/variants/NAME.json and its model to OUTPUT_DIR/work/NAME/final, so a killed
run resumes; the table goes to OUTPUT_DIR/results.md.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from scalevae.claims import NUCLEUS_DECODING, language_model_perplexity, repetition_rate
from scalevae.compare import comparison_spec, reference_language_model, run_settings
from scalevae.control import EDIT_DECODING, evaluate_control
from scalevae.data import prepare_data
from scalevae.evaluation import text_classifier
from scalevae.latent import LatentText
from scalevae.metrics import reconstruction_bleu
from scalevae.recipe import quiet, run
from scalevae.training import fit_prior_families, prior_fit_batches

# name -> (the comparison's run, config overrides, training overrides). The bare names are the defaults (the latent
# enters as a key/value memory slot, 400 steps); every other variant changes one thing.
VARIANTS = {
    "scale_1": ("scale_1", {}, {}),
    "bn": ("bn", {}, {}),
    "vae": ("vae", {}, {}),
    "free_bits": ("free_bits", {}, {}),
    "scale_1-both": ("scale_1", {"latent_injection": "both"}, {}),
    "bn-both": ("bn", {"latent_injection": "both"}, {}),
    "free_bits-both": ("free_bits", {"latent_injection": "both"}, {}),
    "scale_1-embedding": ("scale_1", {"latent_injection": "embedding"}, {}),
    "bn-embedding": ("bn", {"latent_injection": "embedding"}, {}),
    "scale_1-1600steps": ("scale_1", {}, {"max_steps": 1600}),
    "bn-1600steps": ("bn", {}, {"max_steps": 1600}),
    "scale_1-word_dropout0.3": ("scale_1", {"word_dropout": 0.3}, {}),
    "bn-word_dropout0.3": ("bn", {"word_dropout": 0.3}, {}),
}
# Ways to decode the edits (the comparison's is EDIT_DECODING: greedy, no repeated trigram).
EDIT_DECODINGS = {
    "greedy": dict(do_sample=False),
    "greedy, no repeated 3-gram": EDIT_DECODING,
    "greedy, repetition penalty 1.3": dict(do_sample=False, repetition_penalty=1.3),
}
PROBE_SAMPLES = 300
SAMPLE_DECODINGS = {"greedy": dict(do_sample=False), "nucleus 0.9": NUCLEUS_DECODING}
EDIT_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def decode_seeded(text: LatentText, latents: torch.Tensor, decoding: dict, seed: int) -> list[str]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return text.decode_in_batches(latents, 100, **decoding)


def probe_decoding(result, data, reference_lm, classifier, spec, seed: int) -> dict:
    """The figures that change no weights, on one trained model: decoding of samples and edits, the prior family of the
    samples, and the latent a reconstruction is decoded from."""
    model, max_length = result.model.eval(), spec.data.max_length
    text = LatentText(model, data.encoder_tokenizer, data.decoder_tokenizer, max_length=max_length)

    def fluency(texts):
        return dict(
            ppl=language_model_perplexity(reference_lm, data.decoder_tokenizer, texts, max_length),
            repetition=repetition_rate(texts),
        )

    figures = {}
    # How large the injected latent is against what it is added to: the token embeddings (embedding injection).
    if model.injection.to_embedding is not None:
        with torch.no_grad():
            ids = data.decoder_tokenizer(sources := data.texts["test"][:500], add_special_tokens=False).input_ids
            tokens = torch.cat([model.decoder.transformer.wte(torch.tensor(row)) for row in ids if row])
            batch = data.encoder_tokenizer(
                sources, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            latents = model.encode(batch["input_ids"], batch["attention_mask"]).decoder_mu
            injected = model.injection.to_embedding(latents)
        figures["injected / token embedding norm"] = float(injected.norm(dim=1).mean() / tokens.norm(dim=1).mean())
    # Reconstructions from the posterior mean (what every command prints) against one posterior sample (what the
    # decoder was trained on), and the latents' norms in both cases.
    sources = data.texts["test"][:500]
    with torch.no_grad():
        batch = data.encoder_tokenizer(
            sources, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        posterior = model.encode(batch["input_ids"], batch["attention_mask"])
        noise = torch.randn(posterior.decoder_mu.shape, generator=torch.Generator().manual_seed(seed))
        sampled = posterior.decoder_mu + (0.5 * posterior.logvar).exp() * noise
    references = data.decoder_tokenizer.batch_decode(
        data.decoder_tokenizer(sources, add_special_tokens=False).input_ids
    )
    for name, latents in (("mean", posterior.decoder_mu), ("posterior sample", sampled)):
        outputs = text.decode_in_batches(latents, 100, do_sample=False)
        figures[f"reconstruction from {name}"] = dict(
            bleu=reconstruction_bleu(references, outputs),
            norm=float(latents.norm(dim=1).mean()),
            **fluency(outputs),
            examples=outputs[:3],
        )
    # Prior samples: each family fitted to the same training posteriors, each decoding.
    batches = prior_fit_batches(data.dataset["train"], data.collator, spec.run.prior_fit_sentences)
    families = fit_prior_families(model, batches, ("fitted", "full", "mixture"), seed)
    for family, prior in families.items():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            latents = prior.sample((PROBE_SAMPLES,)).float()
        for name, decoding in SAMPLE_DECODINGS.items():
            samples = decode_seeded(text, latents, decoding, seed)
            figures[f"samples: {family} prior, {name}"] = dict(**fluency(samples), examples=samples[:3])
    # Edits under each decoding.
    for name, decoding in EDIT_DECODINGS.items():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            control = evaluate_control(
                text,
                data.texts["test"],
                data.labels["test"],
                classifier,
                strengths=EDIT_STRENGTHS,
                fluency=lambda texts: language_model_perplexity(
                    reference_lm, data.decoder_tokenizer, texts, max_length
                ),
                num_sentences=spec.run.control_sentences,
                seed=seed,
                train_texts=data.texts["train"],
                train_labels=data.labels["train"],
                generation_kwargs=decoding,
            )
        figures[f"edits: {name}"] = {k: v for k, v in control.items() if k != "control_examples"}
        figures[f"edits: {name}"]["examples"] = control["control_examples"].get("1")
    return figures


KEYS = {
    "IW-NLL": "nll",
    "MI dec.": "mi_decoder",
    "recon BLEU": "bleu",
    "cons. data top-1": "consistency_data_top1",
    "cons. prior top-1": "consistency_prior_top1",
    "transfer @ BLEU 1": "control_acc_at_bleu1",
    "sample fwd PPL": "gen_forward_ppl",
    "sample rep.": "gen_repetition",
    "recon PPL": "recon_ppl",
    "recon rep.": "recon_repetition",
    "edit PPL @1": "control_ppl@1.0",
    "edit rep. @1": "control_repetition@1.0",
}


def format_table(rows: dict[str, dict]) -> str:
    lines = ["| variant | " + " | ".join(KEYS) + " | train s |", "|---|" + "---:|" * (len(KEYS) + 1)]
    for name, row in rows.items():
        test = row["test"]
        cells = []
        for key in KEYS.values():
            value = test.get(key, math.nan)
            cells.append("–" if value is None or value != value else f"{value:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/fluency-ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--probe", nargs="*", default=["scale_1", "bn"], help="variants whose decoding is probed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=None, help="the preset's steps unless given (a smoke test)")
    args, rest = parser.parse_known_args(argv)
    output = Path(args.output_dir)
    (output / "variants").mkdir(parents=True, exist_ok=True)
    spec, _ = comparison_spec(
        ["--preset", "yelp-cpu", "--output_dir", str(output), "--eval_splits", "test"]
        + (["--max_steps", str(args.max_steps)] if args.max_steps else [])
        + rest
    )
    with quiet():
        data = prepare_data(spec.replace(training=dict(output_dir=str(output / "work"))))
        reference_lm = reference_language_model(spec, data, output / "reference_lm")
        classifier = text_classifier(data, output / "text_classifier.npz")
    rows = {}
    for name in args.variants:
        path = output / "variants" / f"{name}.json"
        if path.exists():
            rows[name] = json.loads(path.read_text())
            continue
        run_name, config, training = VARIANTS[name]
        fields, kl_schedule = run_settings(run_name)
        if args.max_steps and "max_steps" in training:
            training = {**training, "max_steps": args.max_steps}
        # The model is kept (OUTPUT_DIR/work/NAME/final), so later analyses load it instead of training again.
        run_spec = spec.replace(
            {**fields, **config},
            model=dict(kl_schedule=kl_schedule),
            run=dict(save=True),
            training=dict(seed=args.seed, output_dir=str(output / "work" / name), **training),
        )
        started = time.time()
        result = run(run_spec, data, desc=name, progress=False, reference_lm=reference_lm, classifier=classifier)
        row = dict(
            variant=name,
            steps=result.steps,
            train_seconds=result.train_seconds,
            evaluate_seconds=time.time() - started - result.train_seconds,
            test={k: v for k, v in result.metrics["test"].items() if k != "control_examples"},
            edit_examples=result.metrics["test"].get("control_examples", {}).get("1"),
        )
        if name in args.probe:
            started = time.time()
            row["probes"] = probe_decoding(result, data, reference_lm, classifier, run_spec, args.seed)
            row["probe_seconds"] = time.time() - started
        path.write_text(json.dumps(row, indent=1, default=float))
        rows[name] = row
        print(
            f"{name}: {result.steps} steps in {result.train_seconds:.0f} s, evaluated in {row['evaluate_seconds']:.0f} s"
        )
    table = format_table(rows)
    (output / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
