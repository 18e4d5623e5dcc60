"""Every tensor the model builds lives on the params' device: checked without a GPU.

Each spec in specs/ and tests/specs/ is compiled for PyTorch's `meta` device (tensors with
shapes and no data) and the work of a fit step runs there: the objective (loss and
gradients), held-out NLL and samples. torch refuses to mix a meta tensor with a CPU tensor of any size, as CUDA refuses
to mix CUDA and CPU tensors, so a constant created on the CPU (`eye(D)` without a device, a
prior's argument, a latent's values) fails here as it would on a GPU. Meta tensors also have
no values to read back, so the same run proves the objective never reads a value back to
the host (the optimiser's one read of the loss per step is outside it). (Only the fused path runs here: Pyro's own trace of the model validates values, which
meta tensors do not have.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from probkit.api import prepare
from probkit.compiler import compile_spec
from probkit.infer import Batch, FusedObjective, Params
from probkit.initialise import initial_values
from probkit.tasks.sampling import draw_samples

HERE = Path(__file__).resolve().parent
SPECS = sorted((HERE.parent / "specs").glob("*.yaml")) + sorted((HERE / "specs").glob("*.yaml"))
META = torch.device("meta")


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_a_fit_step_on_the_meta_device_builds_nothing_elsewhere(spec):
    prepared = prepare(spec)
    dataset = prepared.dataset
    model = compile_spec(prepared.loaded, prepared.compiled.dims, device=META)
    start = initial_values(prepared.compiled, 0, data=(dataset.fixed("train"), dataset.train_labels))
    # the AutoDelta guide only holds θ; it is set up by a trace of the Pyro model (which
    # validates values, so it cannot run on meta) and then moved, as a user moves a module
    params = Params(model, prepared.compiled.program.make_guide(values=start).to(META))
    assert all(u.device == META for u in params.unconstrained)
    x = dataset.fixed("train")[:7].to(META)
    labels = dataset.train_labels[:7].to(META) if model.observed_latents else None
    loss = FusedObjective(model).loss(params, Batch(x, labels, 3.0))
    loss.backward()
    assert loss.device == META
    assert all(u.grad is not None and u.grad.device == META for u in params.unconstrained)
    with torch.no_grad():
        values = params.values()
        assert model.joint.log_marginal(values, x).device == META  # held-out NLL: latents summed out
        try:
            assert draw_samples(model, values, 3).device == META
        except NotImplementedError as exc:  # torch has no meta kernel for this sampler (Beta, Binomial)
            assert "Meta" in str(exc) and model.family.name in ("Beta", "Binomial"), exc


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_an_em_step_on_the_meta_device_builds_nothing_elsewhere(spec):
    """EM's E-step statistics and M-step updates stay on the params' device and read nothing back."""
    from probkit.infer.em import EMStepper, em_plan

    prepared = prepare(spec)
    dataset = prepared.dataset
    model = compile_spec(prepared.loaded, prepared.compiled.dims, device=META)
    plan = em_plan(model)
    if not plan.applies:
        pytest.skip(plan.reason)
    start = initial_values(prepared.compiled, 0, data=(dataset.fixed("train"), dataset.train_labels))
    params = Params(model, prepared.compiled.program.make_guide(values=start).to(META))
    stepper = EMStepper(plan, params, chunk=5)
    x = dataset.fixed("train")[:7].to(META)
    labels = dataset.train_labels[:7].to(META) if model.observed_latents else None
    with torch.no_grad():
        values = params.values()
        stats, counts, log_likelihood = stepper.e_step(values, x, labels)
        new = stepper.m_step(values, stats, counts)
    assert log_likelihood.device == META and counts.device == META
    assert all(v.device == META for v in stats.values())
    assert set(new) == {p.name for p in model.params}
    for name, value in new.items():
        assert value.device == META and tuple(value.shape) == tuple(model.param(name).shape), name
