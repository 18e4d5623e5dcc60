"""Every likelihood structure honours its contract, checked against a brute force: its table
is, for every image and latent configuration, the sum over pixels of log p(x_d | ...) with
pixel d's distribution built from the expression evaluated one image and one configuration at
a time — for a structure whose pixels read x, at the image with pixel d and every later pixel
blanked, so the reference cannot see what the order forbids. A structure without cases here
fails."""

import itertools
from pathlib import Path

import pytest
import torch

from probkit import expressions
from probkit.api import prepare
from probkit.distributions import FAMILIES
from probkit.structures.autoregressive import Autoregressive
from probkit.structures.base import Structure
from probkit.structures.independent import Independent

SPECS = Path(__file__).resolve().parents[1] / "specs"
CASES = {
    Independent: ["tiny-mixture.yaml", "tiny-diag.yaml", "tiny-binomial.yaml"],
    Autoregressive: ["tiny-fvsbn-mixture.yaml", "tiny-nade.yaml", "tiny-made.yaml", "tiny-pixelcnn.yaml",
                     "tiny-pixelcnn-levels.yaml"],
}


def test_every_structure_has_cases():
    assert set(Structure.__subclasses__()) == set(CASES)


def _reference(compiled, values, x):
    """N x K: the brute-force table, one image, one configuration and one pixel at a time."""
    site, D = compiled.likelihood, compiled.dims.D
    configurations = list(itertools.product(*(range(l.cardinality) for l in compiled.latents)))
    table = torch.zeros(len(x), max(1, len(configurations)), dtype=torch.float64)
    for n, image in enumerate(x):
        for k, config in enumerate(configurations or [()]):
            env = {**compiled.base_env(), **values}
            env.update({l.name: l.values[i] for l, i in zip(compiled.latents, config)})
            for d in range(D):
                seen = image.clone()
                if compiled.structure.reads_image:
                    seen[d:] = 0.0  # what pixel d may read: the pixels before it
                name, kwargs = expressions.evaluate(site.expr, {**env, "x": seen})
                args = {key: torch.as_tensor(v, dtype=torch.float64) for key, v in kwargs.items()}
                shaped = {key: site.family.configs({key: v}, (), D)[key][0] for key, v in args.items()}
                pixel = {key: v[d] for key, v in shaped.items()}
                table[n, k] += FAMILIES[name].cls(**pixel, validate_args=False).log_prob(image[d]).sum()
    return table


@pytest.mark.parametrize("structure, spec", [(s, name) for s, names in CASES.items() for name in names],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_the_table_equals_a_brute_force_pixel_by_pixel(structure, spec):
    prepared = prepare(SPECS / spec)
    compiled = prepared.compiled
    assert isinstance(compiled.structure, structure)
    if compiled.family.joint:
        pytest.skip("one event over the image: no pixel-by-pixel reference")
    values = {k: v.double() for k, v in compiled.initial_values(3).items()}
    x = prepared.dataset.fixed("train")[:5].double()
    got = compiled.in_dtype(torch.float64).structure.table(values, x)
    expected = _reference(compiled, values, x)
    assert torch.allclose(got.expand_as(expected), expected, rtol=1e-9, atol=1e-9), (got, expected)
