"""PNG figures people would rather look at than read: training curves, a 2-D map of the latent space, and the
attribute-control curve."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .metrics import metric_info  # noqa: E402

# The training curves' panels: the logged figures each plots (line labels from `scalevae.metrics.METRICS`), title.
CURVES = [
    (("reconstruction_loss",), "reconstruction NLL (nats / sentence)"),
    (("kl", "decoder_kl"), "KL (nats / sentence)"),
    (("mi", "mi_decoder"), "mutual information (nats)"),
    (("au", "au_decoder"), "active units"),
]


def plot_training_curves(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """One panel per figure (reconstruction, KL, MI, AU) against the step; one line style per run in `histories`
    (e.g. {"scale": trainer.state.log_history, "vae": ...})."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for ax, (keys, title) in zip(axes, CURVES):
        for (run, history), style in zip(histories.items(), ["-", "--", ":", "-."]):
            for key in keys:
                points = [(h["step"], h[key]) for h in history if key in h]
                if points:
                    steps, values = zip(*points)
                    label = f"{run}: {metric_info(key).label}" if len(keys) > 1 else run
                    ax.plot(steps, values, style, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run too short to log has nothing to label
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_latent_map(
    latents: dict[str, torch.Tensor], path: str | Path, colors: torch.Tensor | None = None, color_label: str = ""
) -> Path:
    """The test set's latents projected on their first two principal components, one panel per run, coloured by
    `colors` (e.g. sentence length) when given."""
    fig, axes = plt.subplots(1, len(latents), figsize=(5 * len(latents), 4.5), squeeze=False)
    for ax, (run, z) in zip(axes[0], latents.items()):
        z = z.float().cpu()
        centred = z - z.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        coords = centred @ v[:2].T
        explained = (s[:2] ** 2 / (s**2).sum()).tolist()
        points = ax.scatter(
            coords[:, 0], coords[:, 1], s=6, alpha=0.7, c=None if colors is None else colors.cpu(), cmap="viridis"
        )
        if colors is not None:
            fig.colorbar(points, ax=ax, label=color_label)
        ax.set_title(f"{run}: PCA of test latents")
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_control(results: dict | list[dict], path: str | Path, title: str = "") -> Path:
    """Transfer accuracy (left axis) and BLEU to the source (right axis) against the edit strength, from
    `scalevae.control.evaluate_control`'s results: one run's dict, or a list over seeds (mean ± sd)."""
    runs = [results] if isinstance(results, dict) else list(results)

    def curve(name):
        strengths = sorted({float(k.split("@", 1)[1]) for run in runs for k in run if k.startswith(name + "@")})
        values = torch.tensor([[run[f"{name}@{s}"] for s in strengths] for run in runs], dtype=torch.float64)
        spread = values.std(0, unbiased=False) if len(runs) > 1 else torch.zeros(len(strengths))
        return strengths, values.mean(0), spread

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    strengths, acc, acc_sd = curve("control_acc")
    ax.errorbar(
        strengths, acc, yerr=acc_sd, marker="o", capsize=3, color="tab:blue", label=metric_info("control_acc").label
    )
    ax.axhline(0.5, color="tab:blue", alpha=0.3, linestyle=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("edit strength (gaps between the class means)")
    ax.set_ylabel(metric_info("control_acc").label)
    twin = ax.twinx()
    strengths, bleu, bleu_sd = curve("control_bleu")
    twin.errorbar(
        strengths,
        bleu,
        yerr=bleu_sd,
        marker="s",
        capsize=3,
        color="tab:orange",
        label=metric_info("control_bleu").label,
    )
    twin.set_ylim(0, 100)
    twin.set_ylabel(metric_info("control_bleu").label)
    seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
    ax.set_title(f"{title or 'attribute control'}{seeds}: transfer and content kept")
    fig.legend(loc="upper center", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, path)


def plot_control_tradeoff(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Two panels over the edit strengths, one curve per remedy (`runs`: name -> its seeds' control results), each
    point one strength (mean over seeds), both against BLEU to the source: transfer accuracy (the remedy whose curve
    lies higher transfers more at equal content kept) and the edits' fluency (perplexity under the reference language
    model, the repetition rate as the marker's label where it is not 0). `title` names the data."""
    from .control import control_curve

    fig, (transfer, fluency) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, seeds in runs.items():

        def mean(figure):
            return torch.tensor([control_curve(r, figure)[1] for r in seeds], dtype=torch.float64).mean(0)

        label = f"{name} ({len(seeds)} seeds)" if len(seeds) > 1 else name
        bleu = mean("control_bleu")
        (line,) = transfer.plot(bleu, mean("control_acc"), marker="o", label=label)
        if all(control_curve(r, "control_ppl")[1] for r in seeds):
            fluency.plot(bleu, mean("control_ppl"), marker="o", color=line.get_color(), label=label)
            if all(control_curve(r, "control_repetition")[1] for r in seeds):
                for x, y, rate in zip(bleu, mean("control_ppl"), mean("control_repetition")):
                    if rate > 0:
                        fluency.annotate(f"{rate:.0%}", (x, y), fontsize=7, color=line.get_color())
    transfer.axhline(0.5, color="grey", alpha=0.4, linestyle=":")
    transfer.set_ylabel(metric_info("control_acc").label)
    transfer.set_ylim(0, 1)
    transfer.set_title(f"{title or 'attribute control'}: transfer against content kept")
    fluency.set_yscale("log")
    fluency.set_ylabel(metric_info("control_ppl").label + " (labels: repetition rate)")
    fluency.set_title(f"{title or 'attribute control'}: fluency of the edits")
    for ax in (transfer, fluency):
        ax.set_xlabel(metric_info("control_bleu").label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from .outputs import atomic_target

    with atomic_target(path) as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_comparison(results: list[dict], summary: dict, output_dir: str | Path) -> list[Path]:
    """The comparison's three figures: training curves per run (first seed), test IW-NLL against MI of the
    decoder's latent (mean ± sd over seeds), and Scale-VAE's des_std sweep."""
    output_dir = Path(output_dir)
    runs = summary["runs"]
    first_seed = {}
    for result in results:
        first_seed.setdefault(result["run"], result)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (key, unit) in zip(
        axes,
        [("reconstruction_loss", "nats / sentence"), ("kl", "nats / sentence"), ("mi_decoder", "nats")],
    ):
        for name, result in first_seed.items():
            points = [(h["step"], h[key]) for h in result["history"] if key in h]
            if points:
                ax.plot(*zip(*points), label=name)
        ax.set_title(f"{metric_info(key).label} ({unit})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths = [_save(fig, output_dir / "comparison_curves.png")]

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, row in runs.items():
        (nll, nll_sd), (mi, mi_sd) = row["test"]["nll_fitted"], row["test"]["mi_decoder"]
        if nll == nll:  # AE has no density
            ax.errorbar(mi, nll, xerr=mi_sd, yerr=nll_sd, fmt="o", capsize=3)
            ax.annotate(name, (mi, nll), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{metric_info('mi_decoder').label} (nats)")
    ax.set_ylabel(f"test {metric_info('nll_fitted').label}")
    ax.set_title("density against latent use (lower right is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, output_dir / "comparison_nll_vs_mi.png"))

    sweep = sorted(
        (float(n[len("scale_") :]), row) for n, row in runs.items() if n.startswith("scale_") and n != "scale_epoch"
    )
    if sweep:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        des = [d for d, _ in sweep]
        for key in ("nll_fitted", "nll_scaled"):
            ax.errorbar(
                des,
                [r["test"][key][0] for _, r in sweep],
                yerr=[r["test"][key][1] for _, r in sweep],
                marker="o",
                capsize=3,
                label=metric_info(key).label,
            )
        ax.set_xlabel("des_std")
        ax.set_ylabel("test IW-NLL (nats / sentence)")
        twin = ax.twinx()
        twin.errorbar(
            des,
            [r["test"]["mi_decoder"][0] for _, r in sweep],
            yerr=[r["test"]["mi_decoder"][1] for _, r in sweep],
            marker="s",
            color="tab:green",
            capsize=3,
            label=metric_info("mi_decoder").label,
        )
        twin.set_ylabel("MI (nats)")
        fig.legend(loc="upper center", fontsize=8, ncol=3)
        ax.grid(alpha=0.3)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        paths.append(_save(fig, output_dir / "comparison_des_std_sweep.png"))
    return paths
