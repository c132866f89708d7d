"""Diffusion objectives and samplers for class-conditional image generation (DiT / SiT style).

Two objectives, one model interface ``model_fn(x, t, y) -> (B, C_out, H, W)``:

- ``GaussianDiffusion``: DiT's DDPM. Linear betas 1e-4..0.02, T = 1000, epsilon prediction;
  optionally learned sigma (IDDPM's "learned range": the model's extra C channels v in [-1, 1]
  interpolate log variance between beta_t and the posterior variance) trained with the hybrid loss
  MSE + variational bound. Samplers: ancestral DDPM on any respaced subset of timesteps
  (``respace``, as DiT's ``space_timesteps``) and deterministic DDIM (eta = 0) or stochastic (eta > 0).
  With fixed sigma the DDPM sampler uses the posterior variance beta~_t (our choice; "fixed small").
- ``FlowMatching``: SiT's linear interpolant x_t = t x_1 + (1 - t) x_0, x_0 ~ N(0, I) noise,
  x_1 data, velocity target x_1 - x_0, t ~ U[0, 1]; Euler or Heun ODE from t = 0 to 1. The model
  sees t * 1000 (our choice) so the same timestep embedder serves both objectives.

Both are written here rather than taken from diffusers: diffusers is not a dependency of sdt, and
its schedulers cover sampling only (not DiT's learned-sigma hybrid loss); each piece is checked in
tests/tasks/test_diffusion.py against closed-form facts (forward marginals, Gaussian posteriors, exact
recovery with a perfect denoiser, exact sampling of a Gaussian data distribution).

Sampling is deterministic given ``generator`` (a seeded ``torch.Generator``): every random draw
goes through it. A setting a user chooses (objective, sampler, steps) that cannot work is a
``ConfigError``.
"""
import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import ConfigError

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]

__all__ = ["GaussianDiffusion", "FlowMatching", "linear_betas", "create_objective", "OBJECTIVES"]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DiT's linear schedule, scaled by 1000 / T as in IDDPM so any T spans the same noise levels. (T,) float64."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def _gather(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values (T,) float64 indexed by t (B,) -> (B, 1, 1, ...) float32 broadcastable to a ndim tensor."""
    return values.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised to 256 bins (IDDPM), element-wise."""
    def cdf(v: Tensor) -> Tensor:
        return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_probs = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_probs))


class GaussianDiffusion:
    """DDPM with epsilon prediction on a (possibly respaced) subset of an original T-step schedule.

    Args:
        betas: (T,) float64 noise schedule (``linear_betas()`` for DiT's).
        learn_sigma: the model outputs 2C channels (epsilon, variance interpolation) and trains with
            the hybrid loss.
        timestep_map: (T',) original timestep index of each step of this (respaced) process; the
            model always sees original indices. None: the identity.
    """

    def __init__(self, betas: Tensor, learn_sigma: bool = False, timestep_map: Optional[Tensor] = None):
        betas = betas.double()
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map.long()
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, with the t = 0 value (0) replaced by the t = 1 value, as IDDPM
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def respace(self, num_steps: int) -> "GaussianDiffusion":
        """The same process on ``num_steps`` evenly spaced timesteps of this one (DiT's ``space_timesteps``).

        New betas keep the marginals: 1 - beta'_i = abar[t_i] / abar[t_{i-1}].
        """
        if not 1 <= num_steps <= self.num_timesteps:
            raise ConfigError(f"num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        keep = _space_timesteps(self.num_timesteps, num_steps)
        abar = self.alphas_cumprod[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1.0 - abar / abar_prev, self.learn_sigma, self.timestep_map[keep])

    # forward process
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. x_start, noise: (B, ...); t: (B,) step indices."""
        return (_gather(self.alphas_cumprod.sqrt(), t, x_start.ndim) * x_start
                + _gather((1.0 - self.alphas_cumprod).sqrt(), t, x_start.ndim) * noise)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and log variance of q(x_{t-1} | x_t, x_0) (log variance clipped at t = 0, as IDDPM)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t.ndim) * x_start + _gather(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        return mean, _gather(self.posterior_log_variance_clipped, t, x_t.ndim).expand_as(x_t)

    def predict_start_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        abar = _gather(self.alphas_cumprod, t, x_t.ndim)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    # reverse process
    def p_mean_variance(self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor, clip_denoised: bool = False) -> Dict[str, Tensor]:
        """The model's p(x_{t-1} | x_t): mean, log variance, predicted x_0 and epsilon.

        ``clip_denoised`` clamps the predicted x_0 to [-1, 1] (pixel-space data, as ADM) and re-derives epsilon
        from it; without it, early steps (abar_t ~ 4e-5 at t = 999) amplify epsilon errors ~150x into x_0.
        """
        out = model_fn(x, self.timestep_map.to(x.device)[t], y)
        channels = x.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma needs a model with {2 * channels} output channels, got {out.shape[1]}")
            eps, v = out[:, :channels], out[:, channels:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x.ndim)
            max_log = _gather(self.betas.log(), t, x.ndim)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = out[:, :channels]
            log_variance = _gather(self.posterior_log_variance_clipped, t, x.ndim).expand_as(x)
        x_start = self.predict_start_from_eps(x, t, eps)
        if clip_denoised:
            x_start = x_start.clamp(-1, 1)
            abar = _gather(self.alphas_cumprod, t, x.ndim)
            eps = (x - abar.sqrt() * x_start) / (1 - abar).sqrt()
        mean, _ = self.q_posterior(x_start, x, t)
        return dict(mean=mean, log_variance=log_variance, x_start=x_start, eps=eps)

    def training_losses(self, model_fn: ModelFn, x_start: Tensor, y: Tensor,
                        generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """DiT's loss at uniformly drawn t: MSE on epsilon (+ the variational bound with learned sigma).

        x_start: (B, C, H, W) data in [-1, 1]; y: (B,) labels. Returns per-sample losses (B,): "loss", "mse" and
        with learned sigma "vb" (bits per dimension; the mean is frozen in it, as IDDPM).
        """
        batch = x_start.shape[0]
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=x_start.device)
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device)
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.timestep_map.to(x_t.device)[t], y)
        channels = x_start.shape[1]
        terms = {"mse": (out[:, :channels] - noise).pow(2).flatten(1).mean(1)}
        if self.learn_sigma:
            frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1)
            p = self.p_mean_variance(lambda *_: frozen, x_t, t, y)
            true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
            kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
            nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
            terms["vb"] = torch.where(t == 0, nll, kl)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    @torch.no_grad()
    def ddpm_sample(self, model_fn: ModelFn, noise: Tensor, y: Tensor, generator: Optional[torch.Generator] = None,
                    clip_denoised: bool = False) -> Tensor:
        """Ancestral sampling over every step of this process (respace first for fewer steps). -> x_0 (B, C, H, W)."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(model_fn, x, t, y, clip_denoised)
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device)
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
            else:
                x = p["mean"]
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, noise: Tensor, y: Tensor, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None, clip_denoised: bool = False) -> Tensor:
        """DDIM (Song et al. 2021) over every step of this process; eta = 0 is deterministic. -> x_0."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(model_fn, x, t, y, clip_denoised)
            abar = _gather(self.alphas_cumprod, t, x.ndim)
            abar_prev = _gather(self.alphas_cumprod_prev, t, x.ndim)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = abar_prev.sqrt() * p["x_start"] + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * p["eps"]
            if eta > 0 and i > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x

    def sample(self, model_fn: ModelFn, noise: Tensor, y: Tensor, sampler: str = "ddim", num_steps: int = 50,
               generator: Optional[torch.Generator] = None, clip_denoised: bool = False) -> Tensor:
        """Respace to ``num_steps`` and run "ddpm" or "ddim" (eta 0)."""
        process = self.respace(num_steps)
        if sampler == "ddpm":
            return process.ddpm_sample(model_fn, noise, y, generator, clip_denoised)
        if sampler == "ddim":
            return process.ddim_sample(model_fn, noise, y, generator=generator, clip_denoised=clip_denoised)
        raise ConfigError(f"sampler {sampler!r} does not fit the DDPM objective; choose 'ddpm' or 'ddim'")


def _space_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """``num_steps`` indices from 0 to T - 1, evenly spaced (rounded), sorted, always including both ends."""
    return torch.round(torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64)).long().unique()


class FlowMatching:
    """SiT's linear interpolant with velocity prediction; t = 0 is noise and t = 1 is data.

    Args:
        time_scale: the model sees t * time_scale (1000: the DDPM timestep range).
    """

    learn_sigma = False

    def __init__(self, time_scale: float = 1000.0):
        self.time_scale = time_scale

    @staticmethod
    def interpolate(x_data: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = t x_1 + (1 - t) x_0 with x_1 = data, x_0 = noise; t: (B,) in [0, 1]."""
        t = t.view(-1, *([1] * (x_data.ndim - 1)))
        return t * x_data + (1 - t) * noise

    def training_losses(self, model_fn: ModelFn, x_start: Tensor, y: Tensor,
                        generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Velocity MSE at t ~ U[0, 1]: ||v(x_t, t, y) - (x_1 - x_0)||^2. Returns per-sample "loss" and "mse" (B,)."""
        batch = x_start.shape[0]
        t = torch.rand(batch, generator=generator, device=x_start.device)
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device)
        out = model_fn(self.interpolate(x_start, noise, t), t * self.time_scale, y)
        mse = (out[:, :x_start.shape[1]] - (x_start - noise)).pow(2).flatten(1).mean(1)
        return {"loss": mse, "mse": mse}

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: Tensor, y: Tensor, sampler: str = "heun", num_steps: int = 50,
               generator: Optional[torch.Generator] = None, clip_denoised: bool = False) -> Tensor:
        """Integrate dx/dt = v(x, t) from t = 0 (noise) to 1 (data) with "euler" or "heun" on a uniform grid.

        ``clip_denoised`` is accepted for the same interface as ``GaussianDiffusion.sample``; the ODE has no
        intermediate x_0 estimate to clip (the caller clamps the output to the data range).
        """
        if sampler not in ("euler", "heun"):
            raise ConfigError(f"sampler {sampler!r} does not fit flow matching; choose 'euler' or 'heun'")
        if num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {num_steps} (0 steps would return the starting noise)")
        channels = noise.shape[1]
        times = torch.linspace(0, 1, num_steps + 1, device=noise.device)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return model_fn(x, torch.full((x.shape[0],), float(t) * self.time_scale, device=x.device), y)[:, :channels]

        x = noise
        for t0, t1 in zip(times[:-1], times[1:]):
            v0 = velocity(x, t0)
            x_euler = x + (t1 - t0) * v0
            if sampler == "heun" and t1 < 1:  # the last step is Euler (SiT's choice; v at t = 1 is ill-posed)
                x = x + (t1 - t0) * 0.5 * (v0 + velocity(x_euler, t1))
            else:
                x = x_euler
        return x


OBJECTIVES = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "flow": ("heun", "euler")}


def create_objective(name: str, learn_sigma: bool = False,
                     num_timesteps: int = 1000) -> Union[GaussianDiffusion, FlowMatching]:
    """"ddpm": ``GaussianDiffusion(linear_betas(num_timesteps), learn_sigma)``; "flow": ``FlowMatching()``."""
    if name == "ddpm":
        return GaussianDiffusion(linear_betas(num_timesteps), learn_sigma)
    if name == "flow":
        if learn_sigma:
            raise ConfigError("flow matching predicts a velocity only: build the model with learn_sigma=False")
        return FlowMatching()
    raise ConfigError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
