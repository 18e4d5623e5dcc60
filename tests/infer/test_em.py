"""EM (probkit.infer.em) against closed-form M-steps written independently here in numpy/scipy.

Each case: a tiny model on 4x4 digits, its k-means start, one EM step through probkit; and
the same step by the textbook: responsibilities from scipy's log densities, then each
param's update given the ones before it (weights, then locations, then spreads). Params are
stored in float32 (unconstrained), so the comparison is to 2e-5 relative (5e-5 for a
precision matrix, which passes through its float32 Cholesky factor).
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from typer.testing import CliRunner

import probkit
from probkit.api import prepare
from probkit.cli import app
from probkit.infer import settings_from
from probkit.infer.em import EMStepper, em_plan
from probkit.infer.objective import Batch, Params
from probkit.initialise import initial_values

HEAD = """\
probkit: 1
name: em-case
data: {{source: digits, size: 4, transform: {transform}, test_fraction: 0.2}}
constants: {{K: 3, R: 2, L: 256, Y: 10}}
"""

CASES = {
    "bernoulli": ("binary", """
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  probs: {shape: [K, D], prior: "Beta(2.0, 3.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Bernoulli(probs=probs[z])
"""),
    "bernoulli-class": ("binary", """
params:
  class_weights: {shape: [Y], prior: Dirichlet(1.5)}
  mix: {shape: [Y, 2], prior: Dirichlet(2.0)}
  probs: {shape: [Y, 2, D], prior: "Beta(1.5, 1.5)"}
latent:
  y: {dist: "Categorical(probs=class_weights)", observed: label}
  z: Categorical(probs=mix[y])
likelihood:
  x: Bernoulli(probs=probs[y, z])
"""),
    "binomial": ("discrete", """
params:
  weights: {shape: [K], prior: Dirichlet(3.0)}
  probs: {shape: [K, D], prior: "Beta(1.5, 2.5)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Binomial(total_count=255, probs=probs[z])
"""),
    "categorical": ("discrete", """
params:
  weights: {shape: [2], prior: Dirichlet(2.0)}
  probs: {shape: [2, D, L], prior: Dirichlet(1.5)}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Categorical(probs=probs[z])
"""),
    "normal-map": ("continuous", """
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], prior: "Normal(0.4, 0.3)"}
  scale: {shape: [K, D], prior: "Gamma(2.0, 10.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
"""),
    "normal-mle": ("continuous", """
params:
  weights: {shape: [K], support: simplex}
  loc: {shape: [K, D], support: real}
  scale: {shape: [K, D], support: positive}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
fit: {method: mle}
"""),
    "normal-inverse-gamma-shared": ("continuous", """
params:
  weights: {shape: [K], prior: Dirichlet(2.0)}
  loc: {shape: [K, D], support: real}
  scale: {shape: [K, 1], prior: "InverseGamma(2.0, 0.05)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
"""),
    "fullcov-wishart": ("continuous", """
params:
  weights: {shape: [2], prior: Dirichlet(2.0)}
  loc: {shape: [2, D], prior: "Normal(0.5, 0.5)"}
  precision: {shape: [2, D, D], prior: "Wishart(df=D + 3.0, precision_matrix=0.05 * eye(D))"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: MultivariateNormal(loc=loc[z], precision_matrix=precision[z])
"""),
    "ppca": ("continuous", """
params:
  loc: {shape: [D], support: real}
  factors: {shape: [D, R], support: real}
  noise: {shape: [], support: positive}
likelihood:
  x: LowRankMultivariateNormal(loc=loc, cov_factor=factors, cov_diag=noise * ones(D))
fit: {method: mle}
"""),
    "mfa": ("continuous", """
params:
  weights: {shape: [2], prior: Dirichlet(2.0)}
  loc: {shape: [2, D], prior: "Normal(0.5, 1.0)"}
  factors: {shape: [2, D, R], prior: "Normal(0.0, 0.5)"}
  psi: {shape: [2, D], prior: "Gamma(1.5, 20.0)"}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: LowRankMultivariateNormal(loc=loc[z], cov_factor=factors[z], cov_diag=psi[z])
"""),
}


def _spec(write_spec, case):
    transform, body = CASES[case]
    return write_spec(HEAD.format(transform=transform) + body, name=case)


def _stepper(spec):
    prepared = prepare(spec)
    compiled, dataset = prepared.compiled, prepared.dataset
    x = dataset.fixed("train")
    labels = dataset.train_labels if compiled.observed_latents else None
    plan = em_plan(compiled)
    assert plan.applies, plan.reason
    start = initial_values(compiled, 0, data=(x, labels), optimizer="em")
    params = Params(compiled, compiled.program.make_guide(0, start))
    stepper = EMStepper(plan, params)
    return stepper, params, Batch(x, labels), prepared


def _np(values):
    return {k: v.detach().double().numpy() for k, v in values.items()}


# ----- the textbook, in numpy ----------------------------------------------------------------

def _component_log_densities(case, v, x):
    """log p(x_n | component k): N x K (N x Y x 2 flattened for the class-conditional case)."""
    if case in ("bernoulli", "bernoulli-class"):
        p = v["probs"].reshape(-1, x.shape[1])
        return x @ np.log(p).T + (1 - x) @ np.log1p(-p).T
    if case == "binomial":
        return np.stack([stats.binom.logpmf(x, 255, p).sum(1) for p in v["probs"]], 1)
    if case == "categorical":
        idx = x.astype(int)
        return np.stack([np.log(p[np.arange(x.shape[1]), idx]).sum(1) for p in v["probs"]], 1)
    if case.startswith("normal"):
        scale = np.broadcast_to(v["scale"], v["loc"].shape)
        return np.stack([stats.norm.logpdf(x, m, s).sum(1) for m, s in zip(v["loc"], scale)], 1)
    if case == "fullcov-wishart":
        return np.stack([stats.multivariate_normal.logpdf(x, m, np.linalg.inv(P))
                         for m, P in zip(v["loc"], v["precision"])], 1)
    if case == "ppca":
        cov = v["factors"] @ v["factors"].T + v["noise"] * np.eye(x.shape[1])
        return stats.multivariate_normal.logpdf(x, v["loc"], cov)[:, None]
    if case == "mfa":
        return np.stack([stats.multivariate_normal.logpdf(x, m, W @ W.T + np.diag(p))
                         for m, W, p in zip(v["loc"], v["factors"], v["psi"])], 1)
    raise KeyError(case)


def _responsibilities(case, v, x, labels):
    table = _component_log_densities(case, v, x)
    if case == "bernoulli-class":
        log_prior = (np.log(v["class_weights"])[:, None] + np.log(v["mix"])).reshape(-1)
        table = table + log_prior
        allowed = (np.arange(10)[:, None] == labels[:, None, None]).repeat(2, -1).reshape(len(x), -1)
        table = np.where(allowed, table, -np.inf)
    elif "weights" in v:
        table = table + np.log(v["weights"])
    return np.exp(table - logsumexp(table, axis=1, keepdims=True))


def _positive_cubic_root(b, c, s):
    """The positive real root of b t^3 + c t^2 - s = 0 (numpy.roots, one element at a time)."""
    out = np.empty(np.broadcast(b, c, s).shape)
    for i, (bi, ci, si) in enumerate(np.broadcast(b, c, s)):
        roots = np.roots([bi, ci, 0.0, -si])
        real = roots[np.abs(roots.imag) < 1e-9].real
        out.flat[i] = real[real > 0].max()
    return out


def _reference_step(case, v, x, labels):
    r = _responsibilities(case, v, x, labels)
    n_k = r.sum(0)
    new = {}
    if "weights" in v:
        alpha = {"bernoulli": 2.0, "binomial": 3.0}.get(case, 2.0)
        counts = n_k + (alpha - 1.0 if case != "normal-mle" else 0.0)
        new["weights"] = counts / counts.sum()
    if case == "bernoulli":
        new["probs"] = (r.T @ x + 1.0) / (n_k[:, None] + 3.0)
    elif case == "bernoulli-class":
        counts = n_k.reshape(10, 2)
        new["class_weights"] = (counts.sum(1) + 0.5) / (counts.sum() + 5.0)
        new["mix"] = (counts + 1.0) / (counts.sum(1, keepdims=True) + 2.0)
        new["probs"] = ((r.T @ x + 0.5) / (n_k[:, None] + 1.0)).reshape(10, 2, -1)
    elif case == "binomial":
        new["probs"] = (r.T @ x + 0.5) / (255.0 * n_k[:, None] + 2.0)
    elif case == "categorical":
        onehot = (x[:, :, None] == np.arange(256)).astype(float)
        counts = np.einsum("nk,ndl->kdl", r, onehot) + 0.5
        new["probs"] = counts / counts.sum(-1, keepdims=True)
    elif case.startswith("normal"):
        scale = np.broadcast_to(v["scale"], v["loc"].shape)
        if case == "normal-map":  # the location given the old scale, with a Normal(0.4, 0.3) prior
            precision = 1.0 / scale**2
            loc = ((r.T @ x) * precision + 0.4 / 0.09) / (n_k[:, None] * precision + 1 / 0.09)
        else:
            loc = (r.T @ x) / n_k[:, None]
        new["loc"] = loc
        squares = np.stack([(r[:, k:k + 1] * (x - loc[k]) ** 2).sum(0) for k in range(len(loc))])
        if case == "normal-map":  # Gamma(2, 10) on the scale: 10 s^3 + (n - 1) s^2 - S = 0
            new["scale"] = _positive_cubic_root(10.0, n_k[:, None] - 1.0, squares)
        elif case == "normal-mle":
            new["scale"] = np.sqrt(squares / n_k[:, None])
        else:  # InverseGamma(2, 0.05) on a scale shared by the pixels: -(n + 3) s^2 + 0.05 s + S = 0
            count, total = n_k * x.shape[1] + 3.0, squares.sum(1)
            new["scale"] = ((0.05 + np.sqrt(0.05**2 + 4 * count * total)) / (2 * count))[:, None]
    elif case == "fullcov-wishart":
        D = x.shape[1]
        locs, precisions = [], []
        for k in range(2):
            P = v["precision"][k]
            A = n_k[k] * P + np.eye(D) / 0.25
            locs.append(np.linalg.solve(A, P @ (r[:, k] @ x) + 0.5 / 0.25))
        for k in range(2):
            centred = x - locs[k]
            S = (r[:, k:k + 1] * centred).T @ centred
            precisions.append((n_k[k] + 3.0 - 1.0) * np.linalg.inv(S + 0.05 * np.eye(D)))
        new["loc"], new["precision"] = np.stack(locs), np.stack(precisions)
    elif case in ("ppca", "mfa"):
        new.update(_factor_analysis_step(case, v, x, r))
    return new


def _factor_analysis_step(case, v, x, r):
    """Ghahramani & Hinton's EM for (mixtures of) factor analysers, with the priors as ridges."""
    D = x.shape[1]
    if case == "ppca":
        locs, factors, psis = v["loc"][None], v["factors"][None], np.full((1, D), float(v["noise"]))
    else:
        locs, factors, psis = v["loc"], v["factors"], v["psi"]
    out_loc, out_w, out_psi = [], [], []
    for k in range(len(locs)):
        m, W, psi, rk = locs[k], factors[k], psis[k], r[:, k]
        R = W.shape[1]
        M = np.eye(R) + W.T @ (W / psi[:, None])
        Minv = np.linalg.inv(M)
        Ez = (x - m) @ (W / psi[:, None]) @ Minv.T  # N x R
        Ez1 = np.hstack([Ez, np.ones((len(x), 1))])
        A = (rk[:, None] * Ez1).T @ Ez1
        A[:R, :R] += rk.sum() * Minv
        B = (rk[:, None] * x).T @ Ez1  # D x (R+1)
        rows = []
        for d in range(D):
            if case == "mfa":  # Normal(0, 0.5) on the factors, Normal(0.5, 1) on the location
                prior_precision = np.diag(np.r_[np.full(R, 1 / 0.25), 1.0])
                prior_sum = np.r_[np.zeros(R), 0.5]
                rows.append(np.linalg.solve(A / psi[d] + prior_precision, B[d] / psi[d] + prior_sum))
            else:
                rows.append(np.linalg.solve(A, B[d]))
        w = np.stack(rows)  # D x (R+1)
        Q = (rk[:, None] * x**2).sum(0) - 2 * (w * B).sum(1) + np.einsum("dr,rs,ds->d", w, A, w)
        if case == "mfa":  # Gamma(1.5, 20) on psi: 40 psi^2 + (n - 1) psi - Q = 0
            c = rk.sum() - 1.0
            out_psi.append((-c + np.sqrt(c * c + 160.0 * Q)) / 80.0)
        else:
            out_psi.append(Q)
        out_w.append(w[:, :R])
        out_loc.append(w[:, R])
    if case == "ppca":
        return {"loc": out_loc[0], "factors": out_w[0], "noise": np.array(out_psi[0].sum() / (D * len(x)))}
    return {"loc": np.stack(out_loc), "factors": np.stack(out_w), "psi": np.stack(out_psi)}


@pytest.mark.parametrize("case", list(CASES))
def test_one_em_step_equals_the_textbook_update(write_spec, case):
    stepper, params, batch, _ = _stepper(_spec(write_spec, case))
    before = _np(params.values())
    x = batch.x.double().numpy()
    labels = None if batch.labels is None else batch.labels.numpy()
    expected = _reference_step(case, before, x, labels)
    stepper.step(None, batch)
    after = _np(params.values())
    assert set(expected) == set(after)
    for name, value in expected.items():
        rtol = 5e-5 if name == "precision" else 2e-5
        scale = np.abs(value).max()
        assert np.abs(after[name] - value).max() <= rtol * scale + 1e-7, (name, np.abs(after[name] - value).max())


@pytest.mark.parametrize("case", list(CASES))
def test_the_log_joint_never_decreases(write_spec, case):
    stepper, params, batch, prepared = _stepper(_spec(write_spec, case))
    losses = [stepper.step(None, batch) for _ in range(12)]
    with torch.no_grad():
        final = float(prepared.compiled.joint.loss(params.values(), batch.x, batch.labels))
    losses.append(final)
    for before, after in zip(losses, losses[1:]):
        assert after <= before + 1e-6 * abs(before), (before, after)
    assert losses[-1] < losses[0]


def _textbook_fixed_point(case, start, x, labels=None, *, limit=5000):
    """The textbook EM update (numpy, float64) iterated from `start` until a step moves no value
    by more than 1e-13: a converged reference that owes nothing to probkit's optimisers."""
    values = start
    for _ in range(limit):
        new = _reference_step(case, values, x, labels)
        moved = max(float(np.abs(new[k] - values[k]).max()) for k in values)
        values = new
        if moved < 1e-13:
            return values
    raise AssertionError(f"the textbook EM did not settle in {limit} steps (last move {moved:.2e})")


def test_em_and_lbfgs_each_reach_the_converged_optimum(write_spec, tmp_path):
    """Each optimiser is compared with one converged reference, never with the other (whose last
    digits depend on the package set): the textbook EM fixed point in float64, reached from
    probkit's EM result (so it is the same one of the mixture's optima).

    Tolerances: EM stores float32 params, so it sits on the fixed point to 2e-5 of each param's
    scale (as one EM step does, above). L-BFGS works on a float32 loss and gradient and stops when
    its line searches find nothing more at that precision (about 1e-6 of the loss above the
    optimum on torch 2.13); it must be within 1e-5 of the loss and 0.5% of each param's scale,
    ten times tighter than the 5-10% the style guide allows fitted values."""
    body = CASES["normal-map"][1].replace("K]", "2]").replace("[K, D]", "[2, D]")
    em = write_spec(HEAD.format(transform="continuous") + body + "fit: {optimizer: em, steps: 400, tolerance: 1e-12}\n",
                    name="em")
    lbfgs = write_spec(HEAD.format(transform="continuous") + body +
                       "fit: {optimizer: lbfgs, steps: 200, tolerance: 1e-12}\n", name="lbfgs")
    by_em = probkit.fit(em, out=tmp_path / "em", device="cpu", samples=0)
    by_lbfgs = probkit.fit(lbfgs, out=tmp_path / "lbfgs", device="cpu", samples=0)
    assert by_em.history[-1]["step"] < 400 and by_lbfgs.history[-1]["step"] < 200  # both stopped themselves
    prepared = prepare(em)
    x = prepared.dataset.fixed("train").double()
    reference = _textbook_fixed_point("normal-map", _np(by_em.values), x.numpy())

    def loss(values):
        with torch.no_grad():
            return float(prepared.compiled.joint.loss({k: torch.as_tensor(v).double() for k, v in values.items()}, x))

    best = loss(reference)
    for fitted, rtol, loss_rtol in ((by_em, 2e-5, 1e-9), (by_lbfgs, 5e-3, 1e-5)):
        values = _np(fitted.values)
        assert set(values) == set(reference)
        for name, value in reference.items():
            error = float(np.abs(values[name] - value).max())
            assert error <= rtol * float(np.abs(value).max()), (fitted.optimizer, name, error)
        assert best <= loss(values) <= best + loss_rtol * abs(best), (fitted.optimizer, loss(values) - best)


def test_auto_picks_em_where_every_param_has_a_closed_form_and_says_why_not_elsewhere(write_spec):
    mixture = prepare(_spec(write_spec, "bernoulli"))
    settings = settings_from(mixture.compiled, mixture.dataset.n_train, steps=None, seed=None)
    assert settings.optimizer == "em" and "closed-form" in settings.choice
    beta = write_spec(HEAD.format(transform="continuous") + """
params:
  a: {shape: [D], prior: "Gamma(2.0, 0.5)"}
  b: {shape: [D], prior: "Gamma(2.0, 0.5)"}
likelihood:
  x: Beta(a, b)
""", name="beta")
    prepared = prepare(beta)
    settings = settings_from(prepared.compiled, prepared.dataset.n_train, steps=None, seed=None)
    assert settings.optimizer == "adam" and "Beta has no closed-form M-step" in settings.choice
    through = write_spec(HEAD.format(transform="continuous") + """
params:
  loc: {shape: [D], support: real}
  log_scale: {shape: [D], support: real}
likelihood:
  x: Normal(loc, exp(log_scale))
""", name="through")
    prepared = prepare(through)
    settings = settings_from(prepared.compiled, prepared.dataset.n_train, steps=None, seed=None)
    assert settings.optimizer == "adam" and "exp(log_scale)" in settings.choice


def test_asking_for_em_where_it_does_not_apply_is_a_spec_error_with_the_line(write_spec, tmp_path):
    spec = write_spec(HEAD.format(transform="continuous") + """
params:
  loc: {shape: [D], prior: "Normal(0.5, 1.0)"}
  scale: {shape: [D], prior: "LogNormal(0.0, 1.0)"}
likelihood:
  x: Normal(loc, scale)
fit:
  optimizer: em
""", name="lognormal")
    result = CliRunner().invoke(app, ["fit", str(spec), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "lognormal.yaml:12" in result.output and "LogNormal" in result.output


def test_fit_reports_the_optimizer_and_the_convergence(write_spec, tmp_path):
    spec = _spec(write_spec, "bernoulli")
    result = CliRunner().invoke(app, ["fit", str(spec), "--out", str(tmp_path / "run"), "--no-progress",
                                      "--steps", "300"])
    assert result.exit_code == 0, result.output
    assert "optimizer: em" in result.output and "converged at step" in result.output
    import json
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["optimizer"] == "em" and info["steps_done"] < 300 and "converged" in info["stopped"]


def test_a_collapse_stops_the_fit_with_the_param_and_the_cure(write_spec, tmp_path):
    # MLE scales with many components on few images: a component shrinks onto one image
    spec = write_spec("""\
probkit: 1
name: collapse
data: {source: digits, size: 4, transform: continuous, count: 40}
constants: {K: 12}
params:
  weights: {shape: [K], support: simplex}
  loc: {shape: [K, D], support: real}
  scale: {shape: [K, D], support: positive}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Normal(loc=loc[z], scale=scale[z])
fit: {method: mle, optimizer: em, steps: 200}
""", name="collapse")
    result = CliRunner().invoke(app, ["fit", str(spec), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "scale" in result.output and "InverseGamma" in result.output and "Traceback" not in result.output


def test_em_statistics_add_up_over_chunks(write_spec):
    stepper, params, batch, _ = _stepper(_spec(write_spec, "mfa"))
    values = {k: v.detach() for k, v in params.values().items()}
    whole = stepper.e_step(values, batch.x, batch.labels)
    stepper.chunk = 7
    pieces = stepper.e_step(values, batch.x, batch.labels)
    for key in whole[0]:
        assert torch.allclose(whole[0][key], pieces[0][key], rtol=1e-10, atol=1e-10), key
    assert torch.allclose(whole[1], pieces[1]) and math.isclose(float(whole[2]), float(pieces[2]), rel_tol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["bernoulli-class", "normal-map", "fullcov-wishart", "mfa"])
def test_an_em_step_on_cuda_equals_the_cpu_one(write_spec, case):
    spec = _spec(write_spec, case)
    cpu, cpu_params, batch, _ = _stepper(spec)
    cpu.step(None, batch)
    prepared = prepare(spec, device="cuda")
    compiled = prepared.compiled
    x = prepared.dataset.fixed("train")
    labels = prepared.dataset.train_labels if compiled.observed_latents else None
    start = initial_values(compiled, 0, data=(x, labels), optimizer="em")
    params = Params(compiled, compiled.program.make_guide(0, start))
    EMStepper(em_plan(compiled), params).step(None, Batch(x, labels))
    for name, value in cpu_params.values().items():
        assert torch.allclose(params.values()[name].cpu(), value, rtol=1e-4, atol=1e-6), name
