"""Seeded fuzzing of specs: a mangled spec is either valid or refused with exit 2 and a line,
never probkit's own failure (exit 1) or a traceback, and validating it takes bounded time."""

import random
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probkit.cli import app

SPECS = Path(__file__).parent / "specs"
SOURCES = ["tiny-mixture.yaml", "tiny-class.yaml", "tiny-em.yaml", "tiny-smooth.yaml", "tiny-diag.yaml"]
TOKENS = [":", "[", "]", "{", "}", "- ", "1e309", "0", "-1", "'", '"', "*", "&a", "*a", "\t", "é", "\x07", "#",
          "K", "D", "z", "(", ")", ",", "/0.0", "**999", "!!python/object:os.system", "~", "null", "yes"]
NUMBERS = ["0", "-1", "1e309", "-1e309", "1e-320", "nan", ".inf", "4294967296", "2.5", "1000000000000",
           "yes", "true", ".nan", "0x10", "1_000"]  # YAML 1.1 booleans, NaN, hex and underscores where numbers go
MUTANTS = int(__import__('os').environ.get('PROBKIT_FUZZ_MUTANTS', 150))
pytestmark = pytest.mark.slow


def _mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(5)
        if kind == 0 and text:  # delete a character
            i = rng.randrange(len(text))
            text = text[:i] + text[i + 1:]
        elif kind == 1:  # insert a token
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif kind == 2 and lines:  # duplicate or drop a line
            lines = text.splitlines()
            i = rng.randrange(len(lines))
            lines[i:i + 1] = [lines[i]] * rng.choice([0, 2])
            text = "\n".join(lines) + "\n"
        elif kind == 3:  # replace a number
            digits = [i for i, c in enumerate(text) if c.isdigit()]
            if digits:
                i = rng.choice(digits)
                j = i
                while j < len(text) and (text[j].isdigit() or text[j] == "."):
                    j += 1
                text = text[:i] + rng.choice(NUMBERS) + text[j:]
        else:  # swap two lines
            lines = text.splitlines()
            if len(lines) > 1:
                i, j = rng.sample(range(len(lines)), 2)
                lines[i], lines[j] = lines[j], lines[i]
                text = "\n".join(lines) + "\n"
    return text


def test_mangled_specs_are_valid_or_refused_with_exit_2(tmp_path):
    rng = random.Random(int(__import__('os').environ.get('PROBKIT_FUZZ_SEED', 20261130)))
    runner = CliRunner()
    failures = []
    for n in range(MUTANTS):
        source = SPECS / SOURCES[n % len(SOURCES)]
        text = _mutate(source.read_text(), rng)
        spec = tmp_path / f"mutant-{n}.yaml"
        spec.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        started = time.perf_counter()
        result = runner.invoke(app, ["validate", str(spec)])
        seconds = time.perf_counter() - started
        said = result.output
        if result.exit_code not in (0, 2) or "Traceback" in said or "failed internally" in said or seconds > 60:
            failures.append((n, source.name, result.exit_code, round(seconds, 1), said[-300:], text))
        elif result.exit_code == 2:
            assert "error:" in said, said
    assert not failures, "\n\n".join(f"mutant {n} of {name}: exit {code}, {s} s\n{said}\n---\n{text}"
                                      for n, name, code, s, said, text in failures[:3])
