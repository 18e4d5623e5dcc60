"""Autoregressive likelihoods: the order is proved, the log-likelihood equals a loop over
pixels, draws follow the exact joint, completions the exact (brute-force) conditional."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from probkit.api import prepare
from probkit.autoregressive import made, made_masks, nade
from probkit.cli import app
from probkit.errors import SpecError, UsageError
from probkit.infer import pyro_elbo, settings_from
from probkit.resources import memory_estimate
from probkit.tasks.completion import complete_images
from probkit.tasks.masks import make_mask
from probkit.tasks.sampling import draw_samples

HERE = Path(__file__).parent
TINY = [HERE / "specs" / f"tiny-{name}.yaml" for name in ("fvsbn-mixture", "nade", "made")]
runner = CliRunner()

FVSBN = """\
probkit: 1
name: micro-fvsbn
data: {{source: digits, size: {size}, transform: binary, test_fraction: 0.2, seed: 0}}
constants: {{K: {K}}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
  A: {{shape: [K, D, D], prior: "Normal(0.0, 1.5)"}}
  b: {{shape: [K, D], prior: "Normal(0.0, 1.5)"}}
latent:
  z: Categorical(probs=weights)
likelihood:
  x: {likelihood}
fit: {{optimizer: adam, steps: 5, batch_size: full}}
"""


def _fvsbn(write_spec, *, size=2, K=2, likelihood="Bernoulli(logits=b[z] + tril(A[z], -1) @ x)"):
    return write_spec(FVSBN.format(size=size, K=K, likelihood=likelihood))


def _all_images(D: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)))


def _random_values(compiled, seed):
    return {k: v.double() for k, v in compiled.initial_values(seed).items()}


# ----- the log-likelihood -----------------------------------------------------------------

def test_fvsbn_mixture_log_likelihood_equals_a_numpy_loop_over_pixels():
    compiled = prepare(TINY[0]).compiled
    values = _random_values(compiled, 3)
    x = prepare(TINY[0]).dataset.fixed("test")[:25].double()
    got = compiled.joint.log_marginal(values, x).numpy()
    w, A, b = (values[k].numpy() for k in ("weights", "A", "b"))
    xs = x.numpy()
    expected = []
    for image in xs:
        per_component = []
        for k in range(len(w)):
            total = math.log(w[k])
            for d in range(len(image)):
                logit = b[k, d] + sum(A[k, d, j] * image[j] for j in range(d))
                total += image[d] * -np.logaddexp(0, -logit) + (1 - image[d]) * -np.logaddexp(0, logit)
            per_component.append(total)
        expected.append(np.logaddexp.reduce(per_component))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_nade_equals_a_loop_over_pixels():
    torch.manual_seed(0)
    D, M = 7, 5
    x = torch.randint(0, 2, (D,)).double()
    U, c, V, b = torch.randn(M, D).double(), torch.randn(M).double(), torch.randn(D, M).double(), torch.randn(D).double()
    expected = []
    for d in range(D):
        h = 1 / (1 + np.exp(-(c.numpy() + U.numpy()[:, :d] @ x.numpy()[:d])))
        expected.append(b.numpy()[d] + V.numpy()[d] @ h)
    np.testing.assert_allclose(nade(x, U, c, V, b).numpy(), expected, rtol=1e-10)


NADE_SPEC = """\
probkit: 1
name: micro-nade
data: {{source: digits, size: 3, transform: binary, test_fraction: 0.2, seed: 0}}
constants: {{K: 3, M: 5}}
params:
  weights: {{shape: [K], prior: Dirichlet(2.0)}}
  U: {{shape: [M, D], prior: "Normal(0.0, 1.0)"}}
  c: {{shape: [K, M], prior: "Normal(0.0, 1.0)"}}
  V: {{shape: [D, M], prior: "Normal(0.0, 1.0)"}}
  b: {{shape: [K, D], prior: "Normal(0.0, 1.0)"}}
{latent}
likelihood:
  x: {likelihood}
fit: {{optimizer: adam, steps: 5, batch_size: full}}
"""
NADE_CASES = {  # plain; a mixture with per-component hidden and output biases; under elementwise functions; named
    "plain": ("", "Bernoulli(logits=nade(x, U, c[0], V, b[0]))"),
    "mixture": ("latent:\n  z: Categorical(probs=weights)", "Bernoulli(logits=nade(x, U, c[z], V, b[z]))"),
    "elementwise": ("latent:\n  z: Categorical(probs=weights)",
                    "Bernoulli(logits=2.0 * tanh(nade(x, U, c[z], V, b[z])) + b[0])"),
    "named": ("latent:\n  z: Categorical(probs=weights)\ndefine:\n  bias: b[z]\n  out: nade(x, U, c[z], V, bias)",
              "Bernoulli(logits=out)"),
}


def _nade_model(write_spec, case):
    latent, likelihood = NADE_CASES[case]
    compiled = prepare(write_spec(NADE_SPEC.format(latent=latent, likelihood=likelihood))).compiled
    torch.manual_seed(3)
    values = {k: (v + torch.randn(v.shape) if k != "weights" else v).double()
              for k, v in compiled.initial_values(0).items()}
    return compiled, values


def _teacher_forced_logits(case, values, x, chosen):
    """Every pixel's logit from the full nade() of each image at its component (teacher forcing)."""
    U, c, V, b = values["U"], values["c"], values["V"], values["b"]
    rows = []
    for image, k in zip(x, chosen.tolist()):
        k = 0 if case == "plain" else k
        out = nade(image, U, c[k], V, b[k])
        rows.append(2.0 * torch.tanh(out) + b[0] if case == "elementwise" else out)
    return torch.stack(rows)


@pytest.mark.parametrize("case", list(NADE_CASES))
@pytest.mark.parametrize("per_image", [True, False])
def test_the_running_nade_stepper_gives_the_teacher_forced_probabilities(write_spec, monkeypatch, case, per_image):
    """The stepper keeps W[:, :d] @ x[:d] per image and configuration; pixel by pixel, as a
    pass writes them, its logits equal the full nade() evaluation's at every pixel; and over
    a subset of the pixels (a completion steps only the missing ones, the others already set).
    per_image: b[z] and c[z] read once per image, or (over the memory limit) at every step."""
    from probkit.structures import autoregressive
    from probkit.structures.autoregressive import RunningNade

    if not per_image:
        monkeypatch.setattr(autoregressive, "ROW_CONSTANTS_ELEMENTS", 0)
    compiled, values = _nade_model(write_spec, case)
    D, N = compiled.dims.D, 6
    x = torch.randint(0, 2, (N, D), generator=torch.Generator().manual_seed(1)).double()
    chosen = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = _teacher_forced_logits(case, values, x, chosen)
    step = compiled.structure.pixel_stepper(values, chosen)
    assert isinstance(step, RunningNade)
    # b[z], c[z] read once per image where the likelihood reads a latent, outside named expressions
    assert bool(step.rows) == (per_image and case in ("mixture", "elementwise"))
    drawn = torch.zeros_like(x)
    for d in range(D):
        got = step(drawn, d)["logits"][:, 0]
        np.testing.assert_allclose(got.numpy(), expected[:, d].numpy(), rtol=1e-12, atol=1e-12)
        drawn[:, d] = x[:, d]  # the pass writes pixel d after its step
    some = [1, 2, 5, 8]  # skipping pixels: the sums catch up over the ones set in between
    observed = x.clone()
    for d in some:
        got = step(observed, d)["logits"][:, 0]
        np.testing.assert_allclose(got.numpy(), expected[:, d].numpy(), rtol=1e-12, atol=1e-12)
    got = step(observed, 4)["logits"][:, 0]  # an earlier pixel starts the pass over
    np.testing.assert_allclose(got.numpy(), expected[:, 4].numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["plain", "mixture"])
def test_sampling_with_the_running_nade_draws_what_the_full_evaluation_draws(write_spec, case):
    """The same seed, the same draw order: the running sums draw the same images as the stepper
    that evaluates every pixel's arguments from scratch (nade() over the whole image) at each pixel."""
    from probkit.tasks.sampling import draw_pixel_by_pixel

    compiled, values = _nade_model(write_spec, case)
    values = {k: v.float() for k, v in values.items()}
    chosen = torch.arange(200) % 3
    structure = compiled.structure

    def full_step(x, d):
        return {arg: value[:, 0, d: d + 1] for arg, value in structure.image_arguments(values, x, chosen).items()}

    draws = {}
    for name, step in (("running", structure.pixel_stepper(values, chosen)), ("full", full_step)):
        torch.manual_seed(7)
        draws[name] = draw_pixel_by_pixel(compiled, values, chosen, step=step)
    assert 0.1 < float(draws["full"].mean()) < 0.9  # the draws are not all one value
    assert torch.equal(draws["running"], draws["full"])


def test_made_output_d_changes_with_earlier_pixels_only():
    torch.manual_seed(0)
    D, M = 6, 9
    layers = [torch.randn(M, D), torch.randn(M), torch.randn(M, M), torch.randn(M), torch.randn(D, M), torch.randn(D)]
    x = torch.rand(D)
    out = made(x, *layers)
    for j in range(D):
        moved = x.clone()
        moved[j] += 1.0
        changed = (made(moved, *layers) - out).abs() > 0
        assert not changed[: j + 1].any(), f"an output at or before {j} read pixel {j}"
    # every output after the first can read something (the masks are not all zero)
    masks = made_masks(D, (M, M))
    assert all(bool(m.any()) for m in masks)


@pytest.mark.parametrize("D, hidden", [(20, (7,)), (20, (19,)), (20, (45, 6)), (3, (1,)), (2, (4,))])
def test_made_reaches_every_earlier_pixel_it_may(D, hidden):
    """The masks' connectivity, multiplied out: output d reads pixel j only when j < d, and the
    last output reads every earlier pixel even through a layer narrower than D - 1; with layers
    of D - 1 units or more, every output reads every earlier pixel."""
    masks = made_masks(D, hidden)
    reach = masks[0]
    for mask in masks[1:]:
        reach = mask @ reach  # paths from each input to each unit of the next layer
    allowed = torch.tril(torch.ones(D, D), -1)
    assert not bool(((reach > 0) & (allowed == 0)).any())
    assert bool((reach[-1, :-1] > 0).all())
    if min(hidden) >= D - 1:
        assert bool(((reach > 0) == (allowed > 0)).all())


@pytest.mark.parametrize("spec", TINY, ids=lambda p: p.stem)
def test_the_table_does_not_depend_on_how_images_are_chunked(spec, monkeypatch):
    """Chunks of one image each and one chunk of every image give the same log-likelihoods,
    and the same gradients."""
    from probkit.families import base

    compiled = prepare(spec).compiled
    values = {k: v.requires_grad_(True) for k, v in _random_values(compiled, 3).items()}
    x = prepare(spec).dataset.fixed("train")[:12].double()
    tables, grads = [], []
    for chunk_elements in (1, base.CHUNK_ELEMENTS):
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk_elements)
        chunk = base.chunk_size(compiled.structure.per_image_elements())
        assert chunk == 1 if chunk_elements == 1 else chunk >= len(x)
        table = compiled.structure.table(values, x)
        tables.append(table.detach())
        grads.append(torch.autograd.grad(table.sum(), list(values.values()), allow_unused=True))
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-6, atol=1e-5)
    for one, whole in zip(*grads):
        assert (one is None) == (whole is None)
        if one is not None:
            torch.testing.assert_close(one, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", TINY, ids=lambda p: p.stem)
def test_fused_loss_equals_pyros_trace_enum_elbo(spec):
    prepared = prepare(spec)
    compiled, dataset = prepared.compiled, prepared.dataset
    guide = compiled.program.make_guide(seed=1)
    values = compiled.program.constrained(guide)
    labels = dataset.train_labels[:40] if compiled.observed_latents else None
    x = dataset.fixed("train")[:40]
    expected = pyro_elbo(compiled).differentiable_loss(compiled.program.model, guide, x, labels)
    fused = compiled.joint.loss(values, x, labels)
    assert torch.allclose(fused, expected, rtol=1e-5), (float(fused), float(expected))


# ----- the order check --------------------------------------------------------------------

@pytest.mark.parametrize("likelihood, words", [
    ("Bernoulli(logits=b[z] + tril(A[z], 0) @ x)", "pixel 0 .* may depend on itself"),
    ("Bernoulli(logits=b[z] + triu(A[z], 1) @ x)", "may depend on the later pixel"),
    ("Bernoulli(logits=b[z] + A[z] @ x)", "not autoregressive"),
    ("Bernoulli(logits=b[z] + tril(A[z], -1) @ sigmoid(x) + 0.1 * x)", "may depend on itself"),
])
def test_a_pixel_that_reads_itself_or_a_later_pixel_is_refused_at_its_line(write_spec, likelihood, words):
    with pytest.raises(SpecError, match=words) as error:
        prepare(_fvsbn(write_spec, size=3, likelihood=likelihood))
    assert "spec.yaml:12:" in str(error.value) and "tril(A, -1)" in str(error.value)


def test_a_dependence_behind_a_param_that_starts_at_zero_is_still_found(write_spec):
    text = FVSBN.format(size=2, K=1, likelihood="Bernoulli(logits=b[z] + tril(A[z], 0) @ x)")
    text = text.replace('prior: "Normal(0.0, 1.5)"}}\n  b', 'prior: "Normal(0.0, 1.5)", init: 0.0}}\n  b')
    text = text.replace('A: {shape: [K, D, D], prior: "Normal(0.0, 1.5)"}',
                        'A: {shape: [K, D, D], prior: "Normal(0.0, 1.5)", init: 0.0}')
    with pytest.raises(SpecError, match="may depend on itself"):
        prepare(write_spec(text))


def test_the_image_as_an_index_or_in_a_joint_family_is_refused(write_spec):
    with pytest.raises(SpecError, match="x cannot be an index"):
        prepare(_fvsbn(write_spec, likelihood="Bernoulli(logits=b[z, x])"))
    with pytest.raises(SpecError, match="one event over the whole image"):
        prepare(_fvsbn(write_spec, likelihood="MultivariateNormal(loc=tril(A[z], -1) @ x, covariance_matrix=eye(D))"))


def test_em_is_not_offered_for_an_autoregressive_likelihood(write_spec):
    compiled = prepare(_fvsbn(write_spec)).compiled
    assert settings_from(compiled, 10, steps=None, seed=None).optimizer == "adam"


# ----- sampling -----------------------------------------------------------------------------

def test_draws_follow_the_exact_joint(write_spec):
    """D = 4 binary pixels: the frequencies of all 16 images in 20,000 draws against the exact
    joint (the model's own log p(x) of every image, a brute-force table), chi-square."""
    compiled = prepare(_fvsbn(write_spec, size=2)).compiled
    values = compiled.initial_values(5)
    images = _all_images(4)
    exact = compiled.joint.log_marginal(values, images).double().exp()
    assert abs(float(exact.sum()) - 1) < 1e-6  # the 16 probabilities of a normalised model
    n = 20_000
    draws = draw_samples(compiled, values, n, seed=1)
    index = (draws @ torch.tensor([8.0, 4.0, 2.0, 1.0])).long()
    counts = torch.bincount(index, minlength=16).double()
    _, p = stats.chisquare(counts.numpy(), (exact / exact.sum() * n).numpy())
    assert p > 1e-3, (counts, exact * n)


def test_mean_images_are_refused_for_an_autoregressive_model(write_spec):
    compiled = prepare(_fvsbn(write_spec)).compiled
    with pytest.raises(UsageError, match="no closed-form mean"):
        draw_samples(compiled, compiled.initial_values(0), 4, mean=True)


# ----- completion -----------------------------------------------------------------------------

def _brute_conditional(compiled, values, x, mask):
    """p(x_miss | x_obs) for every setting of the missing pixels, by enumerating full images."""
    missing = mask.nonzero().flatten()
    settings = _all_images(len(missing))
    rows = x.repeat(len(settings), 1)
    rows[:, missing] = settings
    log_joint = compiled.joint.log_marginal(values, rows).double()
    return settings, (log_joint - log_joint.logsumexp(0))


def test_bottom_half_completion_is_exact(write_spec):
    compiled = prepare(_fvsbn(write_spec, size=2)).compiled
    values = compiled.initial_values(7)
    mask = make_mask("half", 1, 2, 2)
    x = _all_images(4)[[3, 6, 9, 12]]
    result = complete_images(compiled, values, x, mask, k=4000, seed=2)
    assert result.method == "exact-autoregressive"
    nats = []
    for n, image in enumerate(x):
        settings, log_cond = _brute_conditional(compiled, values, image, mask.reshape(-1))
        truth = int(((settings - image[mask.reshape(-1)]).abs().sum(1) == 0).nonzero())
        nats.append(-float(log_cond[truth]))
        # the completions' frequencies of the 4 settings against the exact conditional
        drawn = result.completions[n][:, mask.reshape(-1)]
        index = (drawn @ torch.tensor([2.0, 1.0])).long()
        counts = torch.bincount(index, minlength=4).double()
        _, p = stats.chisquare(counts.numpy(), (log_cond.softmax(0) * 4000).numpy())
        assert p > 1e-3, (counts, log_cond.exp() * 4000)
    expected_bits = float(np.mean(nats)) / (2 * math.log(2))
    assert result.cond_nll_bits_per_pixel == pytest.approx(expected_bits, rel=1e-6)


def test_gibbs_completion_agrees_with_the_exact_conditional(write_spec):
    """The top half is missing, so the observed pixels come after the missing ones: Gibbs.
    Its final states over many chains, and its Rao-Blackwellised mean, against brute force
    (Monte Carlo error: 600 chains, tolerance 0.06 on probabilities, about 5 standard errors)."""
    compiled = prepare(_fvsbn(write_spec, size=2)).compiled
    values = compiled.initial_values(7)
    mask = make_mask("top", 1, 2, 2).reshape(-1)
    x = _all_images(4)[[5, 10]]
    result = complete_images(compiled, values, x, mask, k=600, seed=3, mcmc_warmup=5, mcmc_samples=10)
    assert result.method == "gibbs" and result.cond_nll_bits_per_pixel != result.cond_nll_bits_per_pixel
    for n, image in enumerate(x):
        settings, log_cond = _brute_conditional(compiled, values, image, mask)
        drawn = result.completions[n][:, mask]
        index = (drawn @ torch.tensor([2.0, 1.0])).long()
        frequency = torch.bincount(index, minlength=4).double() / 600
        np.testing.assert_allclose(frequency.numpy(), log_cond.exp().numpy(), atol=0.06)
        exact_mean = (log_cond.exp()[:, None] * settings.double()).sum(0)
        np.testing.assert_allclose(result.mean[n, mask].double().numpy(), exact_mean.numpy(), atol=0.03)
    assert result.settings["kernel"] == "Gibbs" and result.settings["max_split_rhat"] is not None


# ----- end to end -----------------------------------------------------------------------------

def test_fit_sample_complete_and_evaluate_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["fit", str(TINY[1]), "--steps", "3", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", str(run), "-n", "4", "--given", "y=3", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert set(np.unique(np.load(tmp_path / "s.npy"))) <= {0.0, 1.0}
    result = runner.invoke(app, ["sample", str(run), "--mean"])
    assert result.exit_code == 2 and "no closed-form mean" in result.output
    result = runner.invoke(app, ["complete", str(run), "--images", "3", "-k", "2", "--json",
                                 "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["method"] == "exact-autoregressive" and metrics["cond_nll_bits_per_pixel"] > 0
    result = runner.invoke(app, ["complete", str(run), "--images", "2", "-k", "2", "--mask", "center", "--json",
                                 "--mcmc-warmup", "1", "--mcmc-samples", "4", "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["method"] == "gibbs"
    evaluated = json.loads(runner.invoke(app, ["evaluate", str(run), "--json"]).output)
    assert 0 < evaluated["test"]["bits_per_dim"] < 1.5


def test_a_run_fitted_under_another_revision_of_its_building_block_is_refused(tmp_path):
    # MADE's masks changed meaning (revision 2); a MADE run written before run.json recorded the
    # revision was fitted under revision 1, and its weights would be read through other connections
    runs = {}
    for name in ("nade", "made"):
        runs[name] = tmp_path / name
        result = runner.invoke(app, ["fit", str(HERE / "specs" / f"tiny-{name}.yaml"), "--steps", "2",
                                     "--out", str(runs[name]), "--no-progress"])
        assert result.exit_code == 0, result.output
        info = json.loads((runs[name] / "run.json").read_text())
        assert info["revisions"] == {name: {"nade": 1, "made": 2}[name]}
        del info["revisions"]  # as a run written before the revisions were recorded
        (runs[name] / "run.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["evaluate", str(runs["made"]), "--json"])
    assert result.exit_code == 1
    assert "made revision 1" in result.output and "revision 2" in result.output and "Fit the spec again" in result.output
    result = runner.invoke(app, ["sample", str(runs["made"]), "-n", "2", "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 1 and "made revision 1" in result.output
    # a hand-edited record of any JSON shape is refused with the same message, never a traceback
    original = (runs["made"] / "run.json").read_text()
    for odd in ({"made": {"a": [1, 2]}}, {"made": "x" * 100_000}, ["made"], {"made": None}):
        (runs["made"] / "run.json").write_text(json.dumps({**json.loads(original), "revisions": odd}))
        result = runner.invoke(app, ["evaluate", str(runs["made"]), "--json"])
        assert result.exit_code == 1 and "this probkit reads made's params as revision 2" in result.output, odd
        assert len(result.output) < 2000
    (runs["made"] / "run.json").write_text(original)
    # NADE's params have meant one thing throughout: revision 1, whether recorded or not
    result = runner.invoke(app, ["evaluate", str(runs["nade"]), "--json"])
    assert result.exit_code == 0, result.output
    # --resume from a MADE checkpoint written before the record: the same refusal, before any step
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint = runs["made"] / "checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta.pop("revisions")) == {"made": 2}
    save_file(load_file(str(checkpoint)), str(checkpoint), metadata=meta)
    result = runner.invoke(app, ["fit", str(HERE / "specs" / "tiny-made.yaml"), "--steps", "4", "--resume",
                                 "--out", str(runs["made"]), "--no-progress"])
    assert result.exit_code == 2 and "made revision 1" in result.output, result.output
    assert "step,loss" in (runs["made"] / "history.csv").read_text() and "\n3," not in (runs["made"] / "history.csv").read_text()


def test_a_step_whose_per_image_work_would_not_fit_in_memory_is_refused(monkeypatch):
    import probkit.resources
    import probkit.structures.autoregressive

    for module in (probkit.resources, probkit.structures.autoregressive):
        monkeypatch.setattr(module, "memory_bytes", lambda device: 1_000_000)
    with pytest.raises(SpecError, match="numbers per image.*set a smaller fit.batch_size"):
        prepare(TINY[1].parent / "tiny-nade.yaml").compiled  # noqa: B018
    monkeypatch.undo()
    estimate = memory_estimate(prepare(TINY[1]).compiled)
    assert estimate["per-image work"] > 0


# ----- hostile input around expressions and samplers (issue 16) -----------------------------

@pytest.mark.parametrize("likelihood, words", [
    ("Bernoulli(logits=b[z] ** 1e309)", "not finite"),
    ("Bernoulli(logits=b[z] + 10 ** 10 ** 10)", "overflows"),
    ("Bernoulli(logits=b[z] + zeros(1e12)[0])", "at most"),
    ("Bernoulli(logits=b[z]" + " + 0" * 20000 + ")", "characters long"),
])
def test_hostile_expressions_are_refused_at_their_line(write_spec, likelihood, words):
    with pytest.raises(SpecError, match=words):
        prepare(_fvsbn(write_spec, likelihood=likelihood))


def test_sampler_steps_are_bounded_and_a_latent_is_given_once(write_spec):
    from probkit.tasks.sampling import parse_given

    compiled = prepare(_fvsbn(write_spec)).compiled
    values, mask = compiled.initial_values(0), make_mask("top", 1, 2, 2)
    with pytest.raises(UsageError, match="--mcmc-samples 1 to 100,000"):
        complete_images(compiled, values, torch.zeros(1, 4), mask, mcmc_samples=10**20)
    with pytest.raises(UsageError, match="give each latent once"):
        parse_given(["y=1", "y=2"])


def test_continuous_pixels_of_an_autoregressive_model_complete_by_nuts_outside_a_suffix():
    prepared = prepare(TINY[2])  # a MADE with Normal pixels
    compiled = prepared.compiled
    x = prepared.dataset.fixed("test")[:2]
    mask = make_mask("center", 1, 4, 4).reshape(-1)
    result = complete_images(compiled, compiled.initial_values(0), x, mask, k=2, mcmc_warmup=5, mcmc_samples=10)
    assert result.method == "mcmc" and result.settings["kernel"] == "NUTS"
    assert torch.equal(result.completions[:, :, ~mask], x[:, None, ~mask].expand(-1, 2, -1))
    assert torch.isfinite(result.completions).all()
