"""The fit step's fast paths (issue 10) against the plain ones they replace.

The deferred loop (reads the device at read points only) against the step-by-step loop; its
roll-back of non-finite updates; fused Adam's checkpoint round trip; the compiled loss against
the eager one; the large-problem k-means against Lloyd's fixed point.
"""

import shutil
from pathlib import Path

import pytest
import torch

import probkit
from probkit.api import prepare
from probkit.errors import FitError
from probkit.infer import Trainer
from probkit.infer.objective import Batch
from probkit.infer.watch import DeviceWatch

TINY = Path(__file__).parent / "specs" / "tiny-mixture.yaml"
TINY_CLASS = Path(__file__).parent / "specs" / "tiny-class.yaml"


def _step_by_step(monkeypatch):
    monkeypatch.setattr(Trainer, "deferred", property(lambda self: False))


@pytest.mark.parametrize("spec", [TINY, TINY_CLASS], ids=["full-batch", "minibatch-dynamic"])
def test_the_deferred_loop_takes_the_step_by_step_loops_steps(tmp_path, monkeypatch, spec):
    deferred = probkit.fit(spec, steps=12, out=tmp_path / "a", device="cpu", samples=0)
    _step_by_step(monkeypatch)
    plain = probkit.fit(spec, steps=12, out=tmp_path / "b", device="cpu", samples=0)
    for name, value in plain.values.items():
        assert torch.equal(value, deferred.values[name]), name
    assert [(r["step"], r["loss"]) for r in plain.history] == [(r["step"], r["loss"]) for r in deferred.history]


def test_the_deferred_loop_reads_the_device_only_at_its_read_points(tmp_path, monkeypatch):
    """No read per step: without a progress callback, the finiteness flag is read once per
    evaluation/checkpoint (4 here: eval_every 5 of 20 steps), and the per-step synchronous
    Adam step is never taken."""
    from probkit.infer.steppers import AdamStepper

    reads = []
    original = DeviceWatch.all_finite
    monkeypatch.setattr(DeviceWatch, "all_finite", lambda self: reads.append(1) or original(self))
    monkeypatch.setattr(AdamStepper, "step", lambda *a, **k: pytest.fail("a synchronous step was taken"))
    spec = TINY.read_text().replace("steps: 10", "steps: 20\n  eval_every: 5")
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    result = probkit.fit(path, out=tmp_path / "run", device="cpu", samples=0)
    assert [r["step"] for r in result.history] == [5, 10, 15, 20]
    assert len(reads) == 4


def _nan_at_adam_step(bad_step: int):
    """A Trainer._loss that is NaN when Adam has taken `bad_step` steps: a failure tied to the
    optimiser's state, so a replay from an earlier state meets it again at the same step."""
    original = Trainer._loss

    def loss(self, batch):
        value = original(self, batch)
        state = self.stepper.optimizer.state.get(self.unconstrained[0], {})
        if int(state.get("step", 0)) == bad_step:
            return value * float("nan")
        return value

    return loss


def test_a_non_finite_loss_between_read_points_rolls_back_to_the_last_good_state(write_spec, tmp_path,
                                                                                monkeypatch):
    """The loss goes NaN at step 13 of 20, between the checkpoints at steps 10 and 15: the fit
    stops naming step 13, the checkpoint on disk is step 10's, and the params are those before
    step 13's update (12 good steps), not the non-finite ones the queued steps produced."""
    spec = write_spec(TINY.read_text().replace("steps: 10", "steps: 20\n  eval_every: 5"))
    twelve = probkit.fit(spec, steps=12, out=tmp_path / "twelve", device="cpu", samples=0).values
    ten = probkit.fit(spec, steps=10, out=tmp_path / "ten", device="cpu", samples=0).values
    monkeypatch.setattr(Trainer, "_loss", _nan_at_adam_step(12))
    prepared = prepare(spec, device="cpu")
    from probkit.infer import settings_from

    settings = settings_from(prepared.compiled, prepared.dataset.n_train, steps=20, seed=None)
    trainer = Trainer(prepared.compiled, prepared.dataset, settings, tmp_path / "bad")
    (tmp_path / "bad").mkdir()
    assert trainer.deferred
    with pytest.raises(FitError, match=r"non-finite at step 13 .*last good checkpoint \(step 10\)"):
        trainer.run()
    for name, value in twelve.items():
        assert torch.equal(trainer.values()[name], value), name
    from probkit.infer.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "bad")
    assert saved.step == 10
    resumed = Trainer(prepared.compiled, prepared.dataset, settings, tmp_path / "bad", resume=True)
    for name, value in ten.items():
        assert torch.equal(resumed.values()[name], value), name


def test_the_step_by_step_loop_stops_at_the_same_step(write_spec, tmp_path, monkeypatch):
    spec = write_spec(TINY.read_text().replace("steps: 10", "steps: 20\n  eval_every: 5"))
    monkeypatch.setattr(Trainer, "_loss", _nan_at_adam_step(12))
    _step_by_step(monkeypatch)
    with pytest.raises(FitError, match=r"non-finite at step 13 .*last good checkpoint \(step 10\)"):
        probkit.fit(spec, out=tmp_path / "run", device="cpu", samples=0)


def test_fused_adam_state_survives_a_checkpoint_round_trip(tmp_path):
    """The resumed optimiser has the uninterrupted one's state, tensor for tensor."""
    straight = probkit.fit(TINY, steps=8, out=tmp_path / "a", device="cpu", samples=0)
    probkit.fit(TINY, steps=4, out=tmp_path / "b", device="cpu", samples=0)
    resumed = probkit.fit(TINY, steps=8, out=tmp_path / "b", device="cpu", samples=0, resume=True)
    for name, value in straight.values.items():
        assert torch.equal(value, resumed.values[name]), name


def _trainer(tmp_path, spec=TINY, compile="off"):
    from probkit.infer import settings_from

    prepared = prepare(spec, device="cpu")
    settings = settings_from(prepared.compiled, prepared.dataset.n_train, steps=5, seed=None, compile=compile)
    return Trainer(prepared.compiled, prepared.dataset, settings, tmp_path)


def test_an_unknown_compile_setting_is_refused():
    from probkit.errors import UsageError
    from probkit.infer import settings_from

    prepared = prepare(TINY, device="cpu")
    with pytest.raises(UsageError, match="unknown compile setting 'yes' .*off, on"):
        settings_from(prepared.compiled, prepared.dataset.n_train, steps=5, seed=None, compile="yes")


def test_the_loss_is_eager_unless_compile_is_asked_for(tmp_path):
    from probkit.infer import settings_from

    prepared = prepare(TINY, device="cpu")
    assert settings_from(prepared.compiled, prepared.dataset.n_train, steps=5, seed=None).compile == "off"
    assert _trainer(tmp_path).compiled_loss is None


def test_a_loss_that_will_not_compile_falls_back_to_the_eager_loss(tmp_path, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C compiler (simulated)")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    trainer = _trainer(tmp_path, compile="on")
    batch = next(trainer.batches)
    loss = trainer._loss(batch)
    assert "no C compiler (simulated)" in trainer.compiled_loss.fallback
    assert torch.equal(loss, trainer.objective.loss(trainer.params, batch))


def _has_c_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_c_compiler(), reason="torch.compile on the CPU needs a C compiler")
def test_the_compiled_loss_and_gradient_equal_the_eager_ones(tmp_path):
    trainer = _trainer(tmp_path, compile="on")
    batch = next(trainer.batches)
    compiled = trainer._loss(batch)
    compiled.backward()
    assert trainer.compiled_loss.fallback is None, trainer.compiled_loss.fallback
    compiled_grads = [u.grad.clone() for u in trainer.unconstrained]
    for u in trainer.unconstrained:
        u.grad = None
    eager = trainer.objective.loss(trainer.params, Batch(batch.x, batch.labels, batch.scale))
    eager.backward()
    compiled, eager = float(compiled.detach()), float(eager.detach())
    assert abs(compiled - eager) <= 1e-6 * abs(eager), (compiled, eager)
    for got, want in zip(compiled_grads, (u.grad for u in trainer.unconstrained)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


def test_large_kmeans_ends_at_the_means_of_its_clusters(monkeypatch):
    """Above LARGE_KMEANS_WORK (lowered here), k-means seeds from a subsample and refines by
    minibatches, then Lloyd passes; its result is still a seeded set of distinct centres, each
    the mean of the images nearest to it after the last assignment, and it separates well-apart
    clusters."""
    from probkit import kmeans

    monkeypatch.setattr(kmeans, "LARGE_KMEANS_WORK", 1.0)
    monkeypatch.setattr(kmeans, "SEED_POOL", (4, 64))
    monkeypatch.setattr(kmeans, "MINIBATCH", (20, 128))
    generator = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(4, 200, generator=generator) < 0.5).double()  # ~100 pixels apart
    truth = torch.arange(400) % 4
    noise = (torch.rand(400, 200, generator=generator) < 0.01).double()  # ~2 pixels flipped
    images = (prototypes[truth] + noise) % 2

    class Latent:
        name, cardinality, observed = "z", 4, False

    first = kmeans.kmeans(images, None, [Latent()], torch.Generator().manual_seed(1))
    again = kmeans.kmeans(images, None, [Latent()], torch.Generator().manual_seed(1))
    centres, assignment = first
    assert all(torch.equal(centres[k], again[0][k]) for k in centres) and torch.equal(assignment, again[1])
    stacked = torch.stack([centres[(k,)] for k in range(4)])
    for k in range(4):
        members = images[assignment == k]
        assert len(members) and torch.allclose(stacked[k], members.mean(0), atol=1e-5)
    # every true cluster lands in one k-means cluster of its own
    pairs = {(int(t), int(a)) for t, a in zip(truth, assignment)}
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4
