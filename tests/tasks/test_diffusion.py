"""Diffusion objectives and samplers against closed-form facts."""
import math

import pytest
import torch

from sdt.tasks.diffusion import FlowMatching, GaussianDiffusion, create_objective, linear_betas


def test_linear_betas_match_dit():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.all(betas[1:] > betas[:-1])


def test_forward_marginals_match_closed_form():
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, 1 - abar_t), abar_t = prod(1 - beta_s); checked empirically."""
    diffusion = GaussianDiffusion(linear_betas())
    abar = torch.cumprod(1 - linear_betas(), 0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((50_000, 1, 1, 1), 0.7)
    for step in (0, 100, 500, 999):
        t = torch.full((x0.shape[0],), step)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
        assert x_t.mean().item() == pytest.approx(math.sqrt(abar[step]) * 0.7, abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - abar[step].item(), rel=0.03, abs=3e-4)


def test_chained_single_steps_reproduce_marginal():
    """Applying q(x_t | x_{t-1}) t times gives the same distribution as q(x_t | x_0) (mean and variance)."""
    betas = linear_betas(1000)
    generator = torch.Generator().manual_seed(1)
    x = torch.full((20_000,), -0.5, dtype=torch.float64)
    for s in range(100):
        x = (1 - betas[s]).sqrt() * x + betas[s].sqrt() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[99]
    assert x.mean().item() == pytest.approx(abar.sqrt().item() * -0.5, abs=0.01)
    assert x.var().item() == pytest.approx(1 - abar.item(), rel=0.05)


def test_posterior_is_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) from the coefficients equals Bayes' rule on the joint Gaussian."""
    diffusion = GaussianDiffusion(linear_betas())
    abar = diffusion.alphas_cumprod
    for t in (1, 10, 400, 999):
        a_prev, beta = abar[t - 1], diffusion.betas[t]
        # joint of (x_{t-1}, x_t) given x_0: x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) e
        var_prev = 1 - a_prev
        cov = (1 - beta).sqrt() * var_prev
        var_t = 1 - abar[t]
        expected_var = var_prev - cov ** 2 / var_t
        x0, xt = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.2, dtype=torch.float64)
        expected_mean = a_prev.sqrt() * x0 + cov / var_t * (xt - abar[t].sqrt() * x0)
        mean, log_var = diffusion.q_posterior(x0.float().view(1, 1), xt.float().view(1, 1), torch.tensor([t]))
        assert mean.item() == pytest.approx(expected_mean.item(), rel=1e-5, abs=1e-6)
        assert log_var.exp().item() == pytest.approx(expected_var.item(), rel=1e-4)


def test_respacing_keeps_marginals():
    diffusion = GaussianDiffusion(linear_betas())
    spaced = diffusion.respace(25)
    assert spaced.num_timesteps == 25
    assert spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    torch.testing.assert_close(spaced.alphas_cumprod, diffusion.alphas_cumprod[spaced.timestep_map])


def _perfect_eps(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """The exact noise predictor when the data is a single known point x0 (model sees original timesteps)."""
    abar = diffusion.alphas_cumprod

    def model_fn(x, t, y):
        a = abar[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return model_fn


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_perfect_denoiser_recovers_data(sampler):
    diffusion = GaussianDiffusion(linear_betas())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    out = diffusion.sample(_perfect_eps(diffusion, x0), noise, torch.zeros(4, dtype=torch.long), sampler, 20, generator)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_flow_perfect_velocity_recovers_data():
    flow = FlowMatching()
    generator = torch.Generator().manual_seed(0)
    x1 = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1

    def model_fn(x, t, y):  # straight line to x1: v = (x1 - x_t) / (1 - t)
        s = (t / flow.time_scale).view(-1, 1, 1, 1)
        return (x1 - x) / (1 - s)
    for sampler in ("euler", "heun"):
        out = flow.sample(model_fn, torch.randn(x1.shape, generator=generator), torch.zeros(4, dtype=torch.long), sampler, 10)
        torch.testing.assert_close(out, x1, atol=1e-5, rtol=0)


MEAN, STD = 0.4, 0.3  # data distribution N(MEAN, STD^2) per pixel, for which the optimal predictors are closed form


def test_ddim_with_optimal_eps_samples_gaussian_data():
    """For x_0 ~ N(m, s^2): E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / (a s^2 + 1 - a); DDIM on all 1000 steps
    (a fine discretisation of the probability-flow ODE) then samples N(m, s^2)."""
    diffusion = GaussianDiffusion(linear_betas())

    def model_fn(x, t, y):
        a = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MEAN) / (a * STD ** 2 + 1 - a)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(5_000, 1, 1, 1, generator=generator)
    out = diffusion.sample(model_fn, noise, torch.zeros(5_000, dtype=torch.long), "ddim", 1000)
    assert out.mean().item() == pytest.approx(MEAN, abs=0.015)
    assert out.std().item() == pytest.approx(STD, rel=0.03)


def test_heun_with_optimal_velocity_samples_gaussian_data():
    """x_t = t x_1 + (1-t) x_0: E[x_1 - x_0 | x_t] in closed form for x_1 ~ N(m, s^2), x_0 ~ N(0, 1)."""
    flow = FlowMatching()

    def model_fn(x, t, y):
        s = (t / flow.time_scale).view(-1, 1, 1, 1)
        var = s ** 2 * STD ** 2 + (1 - s) ** 2
        residual = x - s * MEAN
        e_data = MEAN + s * STD ** 2 * residual / var
        e_noise = (1 - s) * residual / var
        return e_data - e_noise
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(5_000, 1, 1, 1, generator=generator)
    out = flow.sample(model_fn, noise, torch.zeros(5_000, dtype=torch.long), "heun", 50)
    assert out.mean().item() == pytest.approx(MEAN, abs=0.015)
    assert out.std().item() == pytest.approx(STD, rel=0.03)


def test_sampling_is_deterministic_given_seed():
    diffusion = GaussianDiffusion(linear_betas())
    model_fn = lambda x, t, y: 0.1 * x  # noqa: E731
    y = torch.zeros(2, dtype=torch.long)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return diffusion.sample(model_fn, torch.randn(2, 1, 4, 4, generator=generator), y, "ddpm", 10, generator)
    torch.testing.assert_close(run(3), run(3), atol=0, rtol=0)
    assert not torch.equal(run(3), run(4))


def test_learned_sigma_hybrid_loss():
    """Output channels: eps then v; with v = +1 the variance is beta_t, with -1 the posterior variance; vb >= 0."""
    diffusion = GaussianDiffusion(linear_betas(), learn_sigma=True)
    x = torch.rand(6, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 1, 5, 100, 500, 999])
    for v, expected in ((1.0, diffusion.betas), (-1.0, diffusion.posterior_variance)):
        out = diffusion.p_mean_variance(lambda x_, t_, y_: torch.cat([torch.zeros_like(x_), torch.full_like(x_, v)], 1), x, t, None)
        got = out["log_variance"][:, 0, 0, 0].exp()
        want = expected[t].float()
        if v < 0:
            want[0] = diffusion.posterior_variance[1].float()  # clipped at t = 0, as IDDPM
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)

    model_fn = lambda x_, t_, y_: torch.cat([torch.randn_like(x_), torch.zeros_like(x_)], 1)  # noqa: E731
    terms = diffusion.training_losses(model_fn, x, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "mse", "vb"}
    assert (terms["vb"] >= 0).all() and torch.isfinite(terms["loss"]).all()
    with pytest.raises(ValueError, match="output channels"):
        diffusion.p_mean_variance(lambda x_, t_, y_: x_, x, t, None)


def test_training_losses_are_zero_for_the_true_target():
    diffusion = create_objective("ddpm")
    x = torch.rand(4, 1, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(0)
    # the loss draws t, then the noise, from the generator: replay that order to build the oracle
    g_oracle = torch.Generator().manual_seed(0)
    _ = torch.randint(0, 1000, (4,), generator=g_oracle)  # t, drawn only to advance the generator
    noise = torch.randn(x.shape, generator=g_oracle)
    oracle = lambda x_t, t_, y: noise  # noqa: E731
    assert diffusion.training_losses(oracle, x, torch.zeros(4, dtype=torch.long), g)["loss"].max().item() == 0
    flow = create_objective("flow")
    g, g_oracle = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _ = torch.rand(4, generator=g_oracle)
    noise = torch.randn(x.shape, generator=g_oracle)
    assert flow.training_losses(lambda *_: x - noise, x, torch.zeros(4, dtype=torch.long), g)["loss"].max().item() == 0


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        create_objective("score")
    with pytest.raises(ValueError, match="learn_sigma=False"):
        create_objective("flow", learn_sigma=True)
    with pytest.raises(ValueError, match="'ddpm' or 'ddim'"):
        create_objective("ddpm").sample(lambda *a: a[0], torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), "heun")
    with pytest.raises(ValueError, match="num_steps"):
        create_objective("ddpm").respace(0)
    for steps in (0, -3):  # 0 flow steps returned the starting noise as "samples"
        with pytest.raises(ValueError, match="num_steps must be >= 1"):
            create_objective("flow").sample(lambda *a: a[0], torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
                                            "euler", num_steps=steps)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clip_denoised_keeps_pixels_in_range(sampler):
    """Clamping the predicted x_0 bounds the sample to [-1, 1] even for a bad model; exact data is unaffected."""
    diffusion = GaussianDiffusion(linear_betas())
    bad = lambda x, t, y: 5 * torch.ones_like(x)  # noqa: E731
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.long)
    out = diffusion.sample(bad, noise, y, sampler, 10, torch.Generator().manual_seed(1), clip_denoised=True)
    assert out.abs().max() <= 1 + 1e-5
    assert diffusion.sample(bad, noise, y, sampler, 10, torch.Generator().manual_seed(1)).abs().max() > 10
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    out = diffusion.sample(_perfect_eps(diffusion, x0), noise, y, sampler, 10, torch.Generator().manual_seed(1), clip_denoised=True)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
