"""The probability the Scale-VAE model computes with: Gaussian KLs, the prior families as `torch.distributions`
objects, sampling them with a generator, fitting a Gaussian mixture (k-means, then EM), and the global-batch mean of
data-parallel training.

Reading order: Gaussians and priors -> fitting a mixture -> data parallelism. `modeling_scalevae.py` imports this file,
so every saved model folder carries it (as `checks_scalevae.py` and `loading_scalevae.py`); like them it imports only
torch.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

# ---------------------------------------------------------------------------------------------------------------------
# Gaussians and priors: KLs, the diagonal Gaussian, sampling a prior with a generator
# ---------------------------------------------------------------------------------------------------------------------


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_std: torch.Tensor | None = None,
    prior_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-dimension KL(N(mu, e^logvar) || N(prior_mean, prior_std²)); the prior defaults to N(0, 1)."""
    if prior_mean is not None:
        mu = mu - prior_mean
    if prior_std is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)
    prior_var = prior_std.pow(2)
    return 0.5 * ((mu.pow(2) + logvar.exp()) / prior_var - logvar + prior_var.log() - 1)


def diagonal_gaussian(mean: torch.Tensor, std: torch.Tensor) -> Distribution:
    """N(mean, diag(std²)) as a distribution over vectors (log_prob sums over the last dimension)."""
    return Independent(Normal(mean, std, validate_args=False), 1, validate_args=False)


def prior_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior: Distribution,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """KL(q || p) of q = N(mu, diag(exp(logvar))) to the prior p, per example (summed over dimensions), shape
    `mu.shape[:-1]`.

    Closed form for a Gaussian prior, diagonal or full. A Gaussian mixture has none: its KL is estimated as q's exact
    negative entropy minus the Monte Carlo mean of log p(z) over `num_samples` draws z ~ q per example (`generator`
    seeds them), an unbiased estimate, so the ELBO made from it is an unbiased estimate of a lower bound on log p(x).
    (Deterministic bounds exist, e.g. Hershey & Olsen's −log Σ_k π_k exp(−KL(q || p_k)), but that one overstates the
    KL of a fitted mixture with overlapping components by more than the prior gains.)
    """
    if isinstance(prior, Independent):
        return gaussian_kl(mu, logvar, prior.base_dist.scale, prior.base_dist.loc).sum(-1)
    if isinstance(prior, MultivariateNormal):
        return _full_gaussian_kl(mu, logvar, prior.loc, prior.scale_tril)
    device = generator.device if generator is not None else mu.device
    noise = torch.randn((num_samples, *mu.shape), generator=generator, device=device, dtype=mu.dtype).to(mu.device)
    z = mu + (0.5 * logvar).exp() * noise
    negative_entropy = -0.5 * (logvar + 1 + math.log(2 * math.pi)).sum(-1)
    return negative_entropy - prior.log_prob(z).mean(0)


def _full_gaussian_kl(mu, logvar, loc, scale_tril) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(loc, LLᵀ)) = ½ [tr(Σ⁻¹ diag v) + (loc − mu)ᵀ Σ⁻¹ (loc − mu) − d + log|Σ| − Σ log v]."""
    eye = torch.eye(scale_tril.shape[-1], dtype=scale_tril.dtype, device=scale_tril.device)
    inverse = torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # L⁻¹; diag(Σ⁻¹)_j = ‖L⁻¹ e_j‖²
    trace = (logvar.exp() * inverse.pow(2).sum(-2)).sum(-1)
    mahalanobis = (inverse @ (mu - loc).unsqueeze(-1)).squeeze(-1).pow(2).sum(-1)
    log_det = 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - mu.shape[-1] + log_det - logvar.sum(-1))


def sample_distribution(prior: Distribution, num_samples: int, generator: torch.Generator | None = None):
    """`num_samples` draws (n, d) from a diagonal or full-covariance Gaussian or a mixture of full-covariance
    Gaussians, with `generator` (torch.distributions' own `sample` takes none); the noise is drawn on the generator's
    device, so a CPU generator gives the same draws whatever device the prior is on."""

    def randn(like: torch.Tensor) -> torch.Tensor:
        device = generator.device if generator is not None else like.device
        noise = torch.randn(num_samples, like.shape[-1], generator=generator, device=device, dtype=like.dtype)
        return noise.to(like.device)

    if isinstance(prior, Independent):
        mean, std = prior.base_dist.loc, prior.base_dist.scale
        return mean + randn(std) * std
    if isinstance(prior, MultivariateNormal):
        loc, tril = prior.loc, prior.scale_tril
    else:
        probs = prior.mixture_distribution.probs
        device = generator.device if generator is not None else probs.device
        index = torch.multinomial(probs.to(device), num_samples, True, generator=generator).to(probs.device)
        loc, tril = prior.component_distribution.loc[index], prior.component_distribution.scale_tril[index]
    return loc + (tril @ randn(loc).unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Fitting a mixture of full-covariance Gaussians: k-means++ seeding, then EM
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def fit_gaussian_mixture(
    samples: torch.Tensor,
    num_components: int,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximum-likelihood mixture of full-covariance Gaussians by EM, as scikit-learn's `GaussianMixture` does it
    (started from k-means++-seeded k-means, `reg_covar` added to each covariance's diagonal, stopped when the mean
    log-likelihood gains less than `tol`), in float64. Returns the (normalised log-) weights (k,), means (k, d) and
    Cholesky factors of the covariances (k, d, d)."""
    x = samples.double()
    n, d = x.shape
    if not 1 <= num_components <= n:
        raise ValueError(f"A mixture of {num_components} components needs at least as many samples; got {n}.")
    resp = F.one_hot(_kmeans(x, num_components, generator), num_components).double()
    params = _mixture_m_step(x, resp, reg_covar)
    previous = -float("inf")
    for _ in range(max_iter):
        log_joint = _mixture_log_joint(x, *params)  # (n, k)
        log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
        params = _mixture_m_step(x, (log_joint - log_norm).exp(), reg_covar)
        if abs(log_norm.mean().item() - previous) < tol:
            break
        previous = log_norm.mean().item()
    return params


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator | None, iterations: int = 10) -> torch.Tensor:
    """Cluster labels after k-means++ seeding and a few Lloyd iterations."""
    device = generator.device if generator is not None else "cpu"

    def squared_distances(centres):
        return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centres.T + centres.pow(2).sum(1)).clamp(min=0)

    centres = x[torch.randint(len(x), (1,), generator=generator, device=device).to(x.device)]
    for _ in range(1, k):
        distance = squared_distances(centres).min(1).values
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        chosen = torch.multinomial(weights.to(device), 1, generator=generator).to(x.device)
        centres = torch.cat([centres, x[chosen]])
    for _ in range(iterations):
        labels = squared_distances(centres).argmin(1)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
    return squared_distances(centres).argmin(1)


def _mixture_m_step(x, resp, reg_covar):
    counts = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
    loc = resp.T @ x / counts.unsqueeze(1)
    centred = x.unsqueeze(0) - loc.unsqueeze(1)  # (k, n, d)
    covariance = (centred * resp.T.unsqueeze(-1)).transpose(1, 2) @ centred / counts.view(-1, 1, 1)
    covariance = covariance + reg_covar * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return (counts / len(x)).log(), loc, torch.linalg.cholesky(covariance)


def _mixture_log_joint(x, log_weights, loc, scale_tril):
    """log π_k + log N(x_n; loc_k, L_k L_kᵀ), shape (n, k)."""
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    inverse = torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # (k, d, d): one solve, then products
    whitened = (x.unsqueeze(0) - loc.unsqueeze(1)) @ inverse.transpose(1, 2)  # (k, n, d)
    log_det = 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_density = -0.5 * (whitened.pow(2).sum(-1) + (log_det + x.shape[1] * math.log(2 * math.pi)).unsqueeze(1))
    return (log_weights.unsqueeze(1) + log_density).T


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism: statistics of the global batch, with gradients through the reduction
# ---------------------------------------------------------------------------------------------------------------------


def data_parallel_world() -> int:
    """How many processes train together (DDP, FSDP, DeepSpeed); 1 outside torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: each process's rows then receive the gradient of every
    process's loss through the global statistic, as in SyncBatchNorm."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def global_batch_mean(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over the rows of every process's `values`, global row count) under data parallelism: the sums and counts
    are all-reduced, with gradients flowing back through the reduction to each process's rows."""
    sums = _SumOverProcesses.apply(torch.cat([values.sum(0), values.new_full((1,), values.shape[0])]))
    return sums[:-1] / sums[-1], sums[-1]
