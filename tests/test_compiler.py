"""The compiler: fused log-joint equals Pyro's TraceEnum_ELBO; shape errors name the expression."""

from pathlib import Path

import pytest
import torch

from probkit.api import prepare
from probkit.distributions import FAMILIES
from probkit.errors import SpecError
from probkit.infer import pyro_elbo
from probkit.initialise import initial_values

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))
TEST_SPECS = Path(__file__).resolve().parent / "specs"


@pytest.mark.parametrize("spec", SPECS + [Path(__file__).parent / "specs" / "tiny-mixture.yaml"], ids=lambda p: p.stem)
def test_fused_loss_equals_trace_enum_elbo(spec):
    prepared = prepare(spec)
    compiled, dataset = prepared.compiled, prepared.dataset
    guide = compiled.program.make_guide(seed=1)
    values = compiled.program.constrained(guide)
    labels = dataset.train_labels[:64] if compiled.observed_latents else None
    x = dataset.fixed("train")[:64]  # Pyro's enumeration builds N x K x D (x levels) tensors
    elbo = pyro_elbo(compiled)
    expected = elbo.differentiable_loss(compiled.program.model, guide, x, labels)
    fused = compiled.joint.loss(values, x, labels)
    assert torch.allclose(fused, expected, rtol=1e-5), (float(fused), float(expected))
    # a minibatch: both scale the likelihood by N / B
    batch, batch_labels = x[:20], None if labels is None else labels[:20]
    expected = elbo.differentiable_loss(compiled.program.model, guide, batch, batch_labels, total=len(x))
    fused = compiled.joint.loss(values, batch, batch_labels, scale=len(x) / 20)
    assert torch.allclose(fused, expected, rtol=1e-5), (float(fused), float(expected))


def test_marginal_is_a_brute_force_sum_over_components():
    prepared = prepare(Path(__file__).parent / "specs" / "tiny-mixture.yaml")
    compiled = prepared.compiled
    values = compiled.initial_values(3)
    x = prepared.dataset.fixed("test")[:20].double()
    w, p = values["weights"].double(), values["probs"].double()
    per_component = (x[:, None, :] * p.log() + (1 - x[:, None, :]) * (1 - p).log()).sum(-1) + w.log()
    expected = per_component.logsumexp(-1)
    got = compiled.joint.log_marginal(values, x.float())
    assert torch.allclose(got.double(), expected, rtol=1e-5)


SHAPE_BUG = """\
probkit: 1
name: bad-shape
data: {source: digits, size: 8}
constants: {K: 3}
params:
  weights:
    shape: [K]
    prior: Dirichlet(2.0)
  probs:
    shape: [K, D]
    prior: Beta(2.0, 2.0)
latent:
  z: Categorical(probs=weights)
likelihood:
  x: Bernoulli(probs=probs)
"""


def test_likelihood_shape_mismatch_names_the_line(write_spec):
    with pytest.raises(SpecError, match=r"spec\.yaml:15:6: likelihood\.x: the likelihood has shape \[3, 64\].*probs\[z\]"):
        prepare(write_spec(SHAPE_BUG))


def test_matmul_shape_mismatch_names_the_expression(write_spec):
    text = SHAPE_BUG.replace("latent:", "  w: {shape: [3, 5], support: real}\nlatent:")
    text = text.replace("x: Bernoulli(probs=probs)", "x: Bernoulli(logits=probs[z] @ w)")
    with pytest.raises(SpecError, match=r"likelihood\.x: shape mismatch: .*probs: \[3, 64\]; w: \[3, 5\]"):
        prepare(write_spec(text))


def test_continuous_latent_is_rejected(write_spec):
    text = SHAPE_BUG.replace("z: Categorical(probs=weights)", "z: Normal(0.0, 1.0)")
    with pytest.raises(SpecError, match=r"cannot be enumerated"):
        prepare(write_spec(text))


def test_unknown_shape_name_suggests(write_spec):
    text = SHAPE_BUG.replace("shape: [K, D]", "shape: [KK, D]")
    with pytest.raises(SpecError, match=r"params\.probs\.shape: unknown size 'KK'; did you mean 'K'\?"):
        prepare(write_spec(text))


def test_reserved_names_are_rejected(write_spec):
    text = SHAPE_BUG.replace("constants: {K: 3}", "constants: {K: 3, D: 4}")
    with pytest.raises(SpecError, match=r"constants\.D: 'D' is reserved"):
        prepare(write_spec(text))


def test_init_outside_support_is_rejected(write_spec):
    text = SHAPE_BUG.replace("x: Bernoulli(probs=probs)", "x: Bernoulli(probs=probs[z])")
    text = text.replace("prior: Dirichlet(2.0)", "prior: Dirichlet(2.0)\n    init: -1.0")
    with pytest.raises(SpecError, match=r"params\.weights\.init: the init lies outside"):
        prepare(write_spec(text))


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_log_prior_equals_the_prior_sites_of_the_pyro_model(spec):
    from pyro import poutine

    prepared = prepare(spec)
    compiled = prepared.compiled
    values = initial_values(compiled, 2, data=(prepared.dataset.fixed("train"), prepared.dataset.train_labels))
    trace = poutine.trace(poutine.condition(compiled.program.model, data=values)).get_trace(None, n=1)
    # float64 values on both sides, so float32 summation error (~1e-5 relative) does not blur the check
    # (matrix families such as Wishart only take float32 values; their term is the same on both sides)
    matrix_valued = {p.name for p in compiled.params if p.prior and FAMILIES[p.prior.call_name].event_dim == 2}
    doubled = {k: v if k in matrix_valued else v.double() for k, v in values.items()}
    expected = sum(trace.nodes[p.name]["fn"].log_prob(doubled[p.name]).sum().double() for p in compiled.params)
    got = compiled.joint.log_prior(doubled)
    assert torch.allclose(got.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-3)


def test_compiling_fitting_and_sampling_leave_the_global_rng_alone(tmp_path):
    """Starts, batches, noise and samples come from private seeded generators, never from
    reseeding torch's global one under the caller."""
    import probkit

    spec = Path(__file__).parent / "specs" / "tiny-class.yaml"  # dynamic binarisation: noise each epoch
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    prepared = prepare(spec)
    initial_values(prepared.compiled, 4, data=(prepared.dataset.fixed("train"), prepared.dataset.train_labels))
    probkit.fit(spec, steps=3, out=tmp_path / "run", device="cpu", samples=4)
    probkit.sample(tmp_path / "run", 3, seed=2)
    probkit.complete(tmp_path / "run", images=2, k=2)
    assert torch.equal(torch.rand(5), expected)


def test_data_noise_comes_from_cpu_generators_whatever_the_device():
    from probkit.data import Dequantise, DynamicBinary

    levels = torch.arange(256.0).reshape(4, 64)
    for transform in (Dequantise(), DynamicBinary()):
        on_cpu = transform.apply(levels, torch.Generator().manual_seed(7))
        elsewhere = transform.apply(levels.to("meta"), torch.Generator().manual_seed(7))
        assert elsewhere.device.type == "meta" and elsewhere.shape == on_cpu.shape
        assert torch.equal(on_cpu, transform.apply(levels, torch.Generator().manual_seed(7)))


def test_at_run_time_only_invalid_values_are_outside_the_domain(monkeypatch):
    """A distribution that cannot be built from invalid values is a point outside the model's
    domain (DomainError: L-BFGS steps back); any other error is probkit's own and propagates."""
    import pyro.distributions as dist

    from probkit.errors import DomainError

    compiled = prepare(Path(__file__).parent / "specs" / "tiny-mixture.yaml").compiled
    values = compiled.initial_values(0)
    original = dist.Categorical.__init__

    def failing(error):
        def init(self, *args, **kwargs):
            raise error
        return init

    monkeypatch.setattr(dist.Categorical, "__init__", failing(ValueError("Expected parameter probs ...")))
    with pytest.raises(DomainError, match="Categorical cannot be built from the current parameter values"):
        compiled.joint.latent_table(values)
    monkeypatch.setattr(dist.Categorical, "__init__", failing(IndexError("index 7 is out of bounds")))
    with pytest.raises(IndexError, match="index 7"):
        compiled.joint.latent_table(values)
    monkeypatch.setattr(dist.Categorical, "__init__", original)
    assert torch.isfinite(compiled.joint.latent_table(values)).all()


GRID = """probkit: 1
name: grid
data: {source: digits, size: 8, transform: binary}
constants: {K: 20000}
params:
  a: {shape: [K], prior: Dirichlet(2.0)}
  b: {shape: [K], prior: Dirichlet(2.0)}
  c: {shape: [K], prior: Dirichlet(2.0)}
  probs: {shape: [D], prior: "Beta(2.0, 2.0)"}
latent:
  u: Categorical(probs=a)
  v: Categorical(probs=b)
  w: Categorical(probs=c)
likelihood:
  x: Bernoulli(probs=probs)
"""


@pytest.mark.parametrize("text, message", [
    # 1e11 components: their weights alone need 1.5 TB for a fit
    ((TEST_SPECS / "tiny-mixture.yaml").read_text().replace("K: 3", "K: 100000000000"),
     r"spec\.yaml:\d+:\d+: params\.weights: the params so far hold 100,000,000,000 numbers; a fit would need about "
     r"[\d,.]+ TiB, more than the [\d,.]+ [GT]iB of memory of cpu"),
    # latents of 20,000 values each: 400 million configurations already at the second
    (GRID, r"spec\.yaml:12:\d+: latent\.v: the latents so far take 400,000,000 configurations"),
    ((TEST_SPECS / "tiny-mixture.yaml").read_text().replace("Beta(2.0, 2.0)", "Beta(1e308 * 10.0, 2.0)"),
     r"spec\.yaml:16:12: params\.probs\.prior: Beta's argument concentration1 is not finite"),
])
def test_specs_too_big_for_memory_or_with_overflowed_constants_fail_before_any_allocation(write_spec, text, message):
    from probkit.api import prepare

    with pytest.raises(SpecError, match=message):
        prepare(write_spec(text))


def test_a_memory_limit_counts_what_the_process_already_maps(monkeypatch):
    """Under `ulimit -v`, the memory left is the limit less the address space already mapped
    (torch alone maps hundreds of MiB), not the limit itself."""
    import resource

    from probkit.context import mapped_bytes, memory_bytes

    mapped = mapped_bytes()
    if mapped == 0:
        pytest.skip("no /proc/self/status here")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (mapped + 2**30, resource.RLIM_INFINITY))
    assert abs(memory_bytes() - 2**30) < 64 * 2**20  # what the process maps may move a little between the calls


def test_a_param_too_big_for_a_ulimit_is_refused_at_its_line(write_spec):
    """A 60-million-number param under ulimit -v 3000000 (2.9 GiB): its fit would need ~2.2 GiB
    and about 0.7 GiB is already mapped, so validate refuses it at its line (exit 2) instead of
    the fit failing for memory later."""
    import resource
    import subprocess
    import sys

    text = (TEST_SPECS / "tiny-mixture.yaml").read_text().replace(
        "params:\n", "params:\n  w: {shape: [60000000], support: real}\n", 1)
    spec = write_spec(text)

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (3_000_000 * 1024, resource.getrlimit(resource.RLIMIT_AS)[1]))

    result = subprocess.run([sys.executable, "-m", "probkit", "validate", str(spec)], preexec_fn=limited,
                            capture_output=True, text=True, timeout=300, cwd=spec.parent,
                            env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert result.returncode == 2, result.stdout + result.stderr
    flat = " ".join(result.stderr.split())
    assert "params.w: the params so far hold 60,000,000 numbers" in flat and "Traceback" not in flat


SUPPORT_SPEC = """probkit: 1
name: supports
data: {{source: digits, size: 8, transform: {transform}}}
params:
  a:
    shape: [D]
    {declared}
likelihood:
  x: {likelihood}
"""


@pytest.mark.parametrize("transform, declared, likelihood, words", [
    ("discrete", "prior: Normal(0.0, 1.0)", "Poisson(rate=a)",
     r"spec\.yaml:7:12: params\.a\.prior: a is passed as Poisson's rate \(likelihood\.x\), which must be nonnegative, "
     r"but its prior Normal\(0\.0, 1\.0\) gives it values in real.*Gamma, LogNormal, HalfNormal.*support: positive"),
    ("discrete", "support: real", "Poisson(rate=a)", r"spec\.yaml:7:\d+: params\.a\.support: .*support: real gives"),
    ("binary", "prior: Normal(0.0, 1.0)", "Bernoulli(probs=a)", r"must be unit_interval.*Beta.*sigmoid\(a\)"),
    ("continuous", "prior: Normal(0.0, 1.0)", "Normal(0.5, a)", r"Normal's scale .* must be positive"),
])
def test_a_param_whose_support_leaves_its_arguments_constraint_is_refused_at_its_line(
        write_spec, transform, declared, likelihood, words):
    with pytest.raises(SpecError, match=words):
        prepare(write_spec(SUPPORT_SPEC.format(transform=transform, declared=declared, likelihood=likelihood)))


@pytest.mark.parametrize("transform, declared, likelihood", [
    ("discrete", "prior: Gamma(2.0, 1.0)", "Poisson(rate=a)"),
    ("discrete", "support: positive", "Poisson(rate=a)"),
    ("binary", "prior: Beta(2.0, 2.0)", "Bernoulli(probs=a)"),
    ("binary", "prior: Normal(0.0, 1.0)", "Bernoulli(logits=a)"),
    ("continuous", "prior: HalfNormal(1.0)", "Normal(0.5, a)"),
])
def test_a_param_whose_support_lies_in_its_arguments_constraint_compiles(write_spec, transform, declared, likelihood):
    prepare(write_spec(SUPPORT_SPEC.format(transform=transform, declared=declared, likelihood=likelihood)))
