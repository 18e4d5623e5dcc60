"""Masked convolutions and the image-shaped blocks (probkit.convolution): their masks against
hand-written ones, their layouts against loops, the static order proof against autograd's
Jacobian on random PixelCNN-like networks (sound: never less than the Jacobian reads; and exact
on tanh networks, so an accepted PixelCNN is accepted for the right reason), and the spec-level
refusals at their lines."""

import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from probkit import convolution, expressions
from probkit.api import prepare
from probkit.cli import app
from probkit.context import Context
from probkit.errors import NotAutoregressive
from probkit.structures import dependency

HERE = Path(__file__).parent
runner = CliRunner()


def test_mask_a_keeps_the_positions_before_the_centre_and_b_the_centre_too():
    a = convolution.conv_mask(1, 1, 3, 3, 1, "A")[0, 0]
    assert torch.equal(a, torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]]))
    b = convolution.conv_mask(1, 1, 3, 5, 1, "B")[0, 0]
    assert torch.equal(b, torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))


def test_channel_groups_see_earlier_groups_everywhere_and_their_own_as_the_mask_says():
    # 3 image channels, 6 output channels (groups 0,0,1,1,2,2), 3 input channels (groups 0,1,2)
    mask = convolution.conv_mask(6, 3, 3, 3, 3, "A")
    before = convolution.conv_mask(1, 1, 3, 3, 1, "A")[0, 0]
    for o in range(6):
        for i in range(3):
            expected = torch.ones(3, 3) if i < o // 2 else before if i == o // 2 else torch.zeros(3, 3)
            assert torch.equal(mask[o, i], expected), (o, i)


def test_masked_conv_equals_a_loop_over_the_kept_weights():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    W = torch.randn(3, 2, 3, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(3, generator=generator, dtype=torch.float64)
    out = convolution.masked_conv(h, W, b, "B", 1)
    kept = W * convolution.conv_mask(3, 2, 3, 3, 1, "B").double()
    expected = torch.zeros(3, 4, 5, dtype=torch.float64)
    for o in range(3):
        for r in range(4):
            for c in range(5):
                total = b[o].clone()
                for i in range(2):
                    for u in range(3):
                        for v in range(3):
                            rr, cc = r + u - 1, c + v - 1
                            if 0 <= rr < 4 and 0 <= cc < 5:
                                total += kept[o, i, u, v] * h[i, rr, cc]
                expected[o, r, c] = total
    assert torch.allclose(out, expected, atol=1e-12)


def test_flat_with_levels_puts_channel_c_times_l_plus_l_at_pixel_c_level_l():
    C, L, H, W = 2, 3, 2, 2
    h = torch.arange(C * L * H * W, dtype=torch.float64).reshape(C * L, H, W)
    out = convolution.flat(h, L)
    assert out.shape == (C * H * W, L)
    for c in range(C):
        for level in range(L):
            for r in range(H):
                for col in range(W):
                    assert out[c * H * W + r * W + col, level] == h[c * L + level, r, col]
    assert torch.equal(convolution.flat(convolution.image(torch.arange(12.0), 3, 2, 2)), torch.arange(12.0))


def test_gated_pairs_the_two_halves_of_each_group():
    h = torch.randn(8, 2, 2, dtype=torch.float64)  # 2 groups of 4: halves (0,1 | 2,3) and (4,5 | 6,7)
    out = convolution.gated(h, 2)
    expected = torch.cat([torch.tanh(h[0:2]) * torch.sigmoid(h[2:4]), torch.tanh(h[4:6]) * torch.sigmoid(h[6:8])])
    assert torch.allclose(out, expected)


# ----- the static proof against the Jacobian ----------------------------------------------------

def _network(rng: random.Random, C: int, activation: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """A random PixelCNN-like expression over image(x): an 'A' layer, then B layers, 1x1 layers,
    gated units and residual sums, back to one value per pixel (or C*L channels for flat(h, L))."""
    params: dict[str, tuple[int, ...]] = {}
    F = C * rng.choice([1, 2])
    kernel = rng.choice([(1, 1), (3, 3), (3, 5), (5, 3)])
    params["W0"], params["b0"] = (F, C, *kernel), (F,)
    text = f"{activation}(masked_conv(image(x), W0, b0, mask='A'))"
    for layer in range(1, rng.choice([2, 3, 4])):
        kind = rng.choice(["B", "B", "1x1", "gated", "residual"])
        w, b = f"W{layer}", f"b{layer}"
        if kind == "1x1":
            params[w], params[b] = (F, F), (F,)
            text = f"{activation}(conv1x1({text}, {w}, {b}))"
        elif kind == "gated":
            params[w], params[b] = (2 * F, F, 3, 3), (2 * F,)
            text = f"gated(masked_conv({text}, {w}, {b}, mask='B'))"
        else:
            k = rng.choice([(1, 1), (3, 3)])
            params[w], params[b] = (F, F, *k), (F,)
            conv = f"{activation}(masked_conv({text}, {w}, {b}, mask='B'))"
            text = f"({text} + {conv})" if kind == "residual" else conv
    levels = rng.choice([None, 2])
    params["Wo"], params["bo"] = (C * (levels or 1), F), (C * (levels or 1),)
    head = f"conv1x1({text}, Wo, bo)"
    return (f"flat({head}, {levels})" if levels else f"flat({head})"), params


def _cases(count: int):
    out = []
    for seed in range(count):
        rng = random.Random(seed)
        C = rng.choice([1, 1, 3])
        H, W = rng.choice([(3, 4), (4, 3), (2, 5)])
        out.append((seed, C, H, W, rng.choice(["tanh", "relu", "elu", "sigmoid"])))
    return out


@pytest.mark.parametrize("seed, C, H, W, activation", _cases(24))
def test_the_jacobian_of_random_pixelcnns_lies_inside_the_static_mask_and_tanh_ones_fill_it(
        seed, C, H, W, activation):
    text, shapes = _network(random.Random(seed), C, activation)
    D = C * H * W
    sizes = {"C": C, "H": H, "W": W, "D": D}
    names = set(shapes) | set(sizes) | {"x"}
    expr = expressions.parse(text, path=("x",), smap=None, names=names, allow_distribution=False)
    env = {name: dependency.leaf(torch.empty(shape, device="meta"), D) for name, shape in shapes.items()}
    env.update({name: dependency.leaf(float(v), D) for name, v in sizes.items()})
    env["x"] = dependency.leaf(torch.empty(D, device="meta"), D, reads=dependency.pixels(D))
    abstract = dependency.analyse(expr, env, D)
    reads = dependency._ndim(abstract.deps, len(abstract.shape) + 1).expand(*abstract.shape, D).reshape(-1, D)
    generator = torch.Generator().manual_seed(seed)
    seen = torch.zeros_like(reads)
    for _ in range(3):
        values = {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()}

        def f(x):
            out = expressions.evaluate(expr, {**values, **sizes, "x": x}, Context(dtype=torch.float64))
            return out.reshape(-1)

        jacobian = torch.autograd.functional.jacobian(f, torch.rand(D, generator=generator, dtype=torch.float64))
        nonzero = jacobian != 0
        assert not bool((nonzero & ~reads).any()), (text, (nonzero & ~reads).nonzero()[:3].tolist())
        seen |= nonzero
    # causal by construction: every element at pixel d reads only pixels before d
    rows = dependency.pixel_reads(abstract, 2 if abstract.value.dim() == 2 else 1, D)
    assert dependency.first_violation(rows) is None, text
    if activation == "tanh" and "gated" not in text:  # no zero derivatives: the mask is exactly what is read
        assert torch.equal(seen, reads), text


# ----- specs -----------------------------------------------------------------------------------

def _spec(tmp_path, define: str, likelihood: str, params: str, size=5, channels=1):
    path = tmp_path / "spec.yaml"
    path.write_text(f"""\
probkit: 1
name: conv
data: {{source: digits, size: {size}, channels: {channels}, transform: binary, test_fraction: 0.2, seed: 0}}
params:
{params}
define:
{define}
likelihood:
  x: {likelihood}
fit: {{optimizer: adam, steps: 3, batch_size: full}}
""")
    return path


PARAMS = """\
  W0: {shape: [4, C, 3, 3], prior: "Normal(0.0, 0.5)"}
  b0: {shape: [4], prior: "Normal(0.0, 1.0)"}
  Wo: {shape: [C, 4], prior: "Normal(0.0, 0.5)"}
  bo: {shape: [C], prior: "Normal(0.0, 1.0)"}"""


def test_a_first_layer_with_mask_b_is_refused_at_its_own_line_with_exit_2(tmp_path):
    path = _spec(tmp_path, "  h: relu(masked_conv(image(x), W0, b0, mask='B'))", "Bernoulli(logits=flat(conv1x1(h, Wo, bo)))",
                 PARAMS)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "spec.yaml:10:6: define.h: not autoregressive" in text, text
    assert "pixel 0 (row 0, column 0) may depend on itself" in text and "mask='A'" in text


def test_an_rgb_pixelcnn_is_accepted_and_a_plain_convolution_of_its_channels_is_not(tmp_path):
    good = _spec(tmp_path, "  h: relu(masked_conv(image(x), W0, b0, mask='A'))",
                 "Bernoulli(logits=flat(conv1x1(h, Wo, bo)))", PARAMS.replace("[4, C", "[6, C").replace(
                     "[4]", "[6]").replace("[C, 4]", "[C, 6]"), channels=3)
    prepare(good)
    # the head mixes every channel at a position, so red's logit would read green and blue there:
    # groups keep it causal only when the head is conv1x1, not when the channels are summed
    bad = _spec(tmp_path, "  h: relu(masked_conv(image(x), W0, b0, mask='A'))",
                "Bernoulli(logits=flat(conv1x1(h, Wo, bo) + sum(h, 0)))",
                PARAMS.replace("[4, C", "[6, C").replace("[4]", "[6]").replace("[C, 4]", "[C, 6]"), channels=3)
    with pytest.raises(NotAutoregressive):
        prepare(bad)


def test_a_mask_that_is_not_a_or_b_and_a_kernel_of_even_size_are_refused_at_the_line(tmp_path):
    path = _spec(tmp_path, "  h: masked_conv(image(x), W0, b0, mask=A)", "Bernoulli(logits=flat(conv1x1(h, Wo, bo)))",
                 PARAMS)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "mask must be 'A'" in result.output, result.output
    path = _spec(tmp_path, "  h: masked_conv(image(x), W0, b0, mask='A')", "Bernoulli(logits=flat(conv1x1(h, Wo, bo)))",
                 PARAMS.replace("[4, C, 3, 3]", "[4, C, 2, 2]"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "odd sizes" in result.output and "spec.yaml:10:" in result.output, result.output


@pytest.mark.parametrize("name", ["tiny-pixelcnn.yaml", "tiny-pixelcnn-levels.yaml"])
def test_the_pixelcnn_test_specs_compile_as_autoregressive(name):
    prepared = prepare(HERE / "specs" / name)
    assert prepared.compiled.structure.name == "autoregressive"


# ----- drawing pixel by pixel on a window ---------------------------------------------------------

@pytest.mark.parametrize("seed, C, H, W, activation", _cases(12))
def test_a_network_on_the_window_around_each_pixel_gives_that_pixels_output_exactly(seed, C, H, W, activation):
    text, shapes = _network(random.Random(seed), C, activation)
    D = C * H * W
    sizes = {"C": C, "H": H, "W": W, "D": D}
    expr = expressions.parse(text, path=("x",), smap=None, names=set(shapes) | set(sizes) | {"x"},
                             allow_distribution=False)
    radius = convolution.crop_radius({"logits": expr.tree}, (), shapes)
    assert radius is not None, text
    generator = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()}
    image = torch.rand(D, generator=generator, dtype=torch.float64)
    ctx = Context(dtype=torch.float64)
    full = expressions.evaluate(expr, {**values, **sizes, "x": image}, ctx)
    for d in range(D):
        local = expressions.evaluate(expr, {**values, **sizes, "x": image, expressions.CROP_KEY: (d, radius)}, ctx)
        assert torch.allclose(local.squeeze(-2) if full.dim() == 2 else local.squeeze(-1), full[d], atol=1e-12), (d, text)


@pytest.mark.parametrize("text", [
    "flat(masked_conv(image(x), W0, b0, mask='A') + image(v))",  # a position-dependent map
    "flat(masked_conv(image(x), W0, b0, mask='A')) + x",          # the whole image beside the pixel's output
    "sum(flat(masked_conv(image(x), W0, b0, mask='A')))",         # every position's output at once
    "A @ flat(masked_conv(image(x), W0, b0, mask='A'))",
])
def test_a_network_that_is_not_the_same_at_every_position_is_evaluated_whole(text):
    shapes = {"W0": (1, 1, 3, 3), "b0": (1,), "v": (12,), "A": (12, 12)}
    expr = expressions.parse(text, path=("x",), smap=None, names=set(shapes) | {"x", "C", "H", "W", "D"},
                             allow_distribution=False)
    assert convolution.crop_radius({"logits": expr.tree}, (), shapes) is None


@pytest.mark.parametrize("name", ["tiny-pixelcnn.yaml", "tiny-pixelcnn-levels.yaml"])
def test_the_pixel_stepper_of_the_pixelcnn_specs_uses_the_window_and_equals_the_full_evaluation(name, monkeypatch):
    prepared = prepare(HERE / "specs" / name)
    model = prepared.compiled
    generator = torch.Generator().manual_seed(1)
    values = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in model.initial_values(0).items()}
    x = prepared.dataset.fixed("test")[:5]
    chosen = torch.zeros(5, dtype=torch.long)
    full = model.structure.image_arguments(values, x, chosen)
    windows = []
    original = convolution.crop

    def counted(h, d, radius, *dims):
        windows.append(h.shape[-2:])
        return original(h, d, radius, *dims)

    monkeypatch.setattr(convolution, "crop", counted)
    step = model.structure.pixel_stepper(values, chosen)
    for d in range(model.dims.D):
        for arg, value in step(x, d).items():
            assert torch.allclose(value, full[arg][:, 0, d:d + 1], atol=1e-5), (name, d)
    assert len(windows) == model.dims.D  # every step ran on a window
