"""The spec: YAML text -> a validated pydantic object whose errors point at file:line:column.

YAML is composed into nodes first so that every value keeps its position; pydantic then
checks the structure (unknown keys are errors), and each error is translated back to the
line and column of the offending key or value, with a "did you mean" where one fits.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from probkit.errors import SpecError

Location = tuple[int, int]  # 1-based line, column
KeyPath = tuple[Union[str, int], ...]


MAX_SEED = 2**32 - 1  # seeds are 32-bit: numpy's and torch's generators both take them
MAX_RESTARTS = 100  # fit.restarts: each start costs a k-means and fit.restart_steps EM steps


def _not_yes_or_no(value):
    """YAML reads true/false/yes/no/on/off as booleans, which pydantic would take as 1 and 0: a
    `size: yes` or `K: true` is a slip to refuse, not a number."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a yes-or-no value (YAML reads true, false, yes, no, on and off "
                         "as those)")
    return value


Int = Annotated[int, BeforeValidator(_not_yes_or_no)]
# a number in a spec is finite: YAML 1.1 reads `1e309` as text, which pydantic would turn into inf
Float = Annotated[float, BeforeValidator(_not_yes_or_no), Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _split_or_mapping(value):
    """`test:` is the word split or a mapping: anything else gets one message naming both forms."""
    if value is None or value == "split" or isinstance(value, dict):
        return value
    raise ValueError("expected 'split' (the source's own test split) or a mapping {source: ...} (held-out images "
                     "from a second source)")


class HeldOutSourceSpec(_Strict):
    """Held-out images from a second source, prepared as the training images are (docs/data.md)."""

    source: str = Field(description="a built-in data set name, or a path relative to the spec")
    count: Int | None = Field(None, gt=0, description="how many of its images to keep (seeded by data.seed)")


class DataSpec(_Strict):
    """Where the images come from and how they are prepared (docs/data.md)."""

    source: str = Field(description="a built-in data set name, or a path relative to the spec")
    size: Union[Int, tuple[Int, Int]] = Field(32, description="resize to size x size or [H, W]")
    channels: Annotated[Literal[1, 3], BeforeValidator(_not_yes_or_no)] = Field(1, description="1 grayscale, 3 RGB")
    transform: Literal["binary", "continuous", "discrete"] = Field("binary")
    threshold: Float = Field(0.5, gt=0, lt=1, description="binary: pixels above are 1")
    binarize: Literal["fixed", "dynamic"] = Field(
        "fixed", description="binary: 'dynamic' resamples x ~ Bernoulli(intensity) each epoch"
    )
    test_fraction: Float = Field(0.2, ge=0, lt=1, description="share of the images held out at random")
    test: Annotated[Union[Literal["split"], HeldOutSourceSpec, None], BeforeValidator(_split_or_mapping)] = Field(
        None, description="named held-out images instead of test_fraction: 'split' (the source's own test "
        "split) or {source: ...} (a second source)")
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="fixes the train/held-out split and generated data")
    count: Int | None = Field(None, gt=0, description="how many images to generate or keep")

    @field_validator("size")
    @classmethod
    def _positive_size(cls, value):
        sizes = (value,) if isinstance(value, int) else value
        if any(s < 1 or s > 512 for s in sizes):
            raise ValueError("size must be between 1 and 512 pixels")
        return value

    @model_validator(mode="after")
    def _one_held_out_rule(self):
        if self.test is not None and "test_fraction" in self.model_fields_set:
            raise ValueError("give either test_fraction (held-out images drawn at random) or test (named "
                             "held-out images), not both")
        return self

    @property
    def hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)


class ParamSpec(_Strict):
    """A global random variable of theta."""

    shape: list[Union[Int, str]] = Field(default_factory=list, description="dims: ints or names")
    prior: str | None = Field(None, description="a distribution expression; makes the fit MAP")
    support: str | None = Field(None, description="the constraint of a param without prior")
    init: Union[Float, str, None] = Field(None, description="a number or an expression")

    @model_validator(mode="after")
    def _prior_or_support(self):
        if self.prior is None and self.support is None:
            raise ValueError(
                "a param needs either 'prior:' (a distribution) or 'support:' "
                "(real, positive, unit_interval, simplex, lower_cholesky, ...)"
            )
        return self


class LatentSpec(_Strict):
    """A per-image random variable, either summed out or observed as the data set's label."""

    dist: str = Field(description="a discrete distribution expression")
    observed: Literal["label"] | None = Field(None, description="'label' to see it in training")


class LikelihoodSpec(_Strict):
    x: str = Field(description="the distribution of the flat image x (D values)")


class FitSpec(_Strict):
    method: Literal["map", "mle"] = "map"
    optimizer: Literal["auto", "em", "adam", "lbfgs"] = "auto"
    lr: Float = Field(0.05, gt=0)
    steps: Int = Field(2000, ge=0)
    batch_size: Union[Int, Literal["full"]] = "full"
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    eval_every: Int | None = Field(None, gt=0, description="held-out evaluation period (steps)")
    tolerance: Float | None = Field(None, ge=0, description="stop when 3 steps in a row each change the loss by "
                                    "less than this share of it (default 1e-7 for em; 0, never, for the others)")
    restarts: Int = Field(1, ge=1, le=MAX_RESTARTS, description="EM only: how many starts (seeds fit.seed, "
                          "fit.seed + 1, ...; k-means each) run fit.restart_steps EM steps; the best by the fit's "
                          "objective continues")
    restart_steps: Int = Field(20, ge=1, le=10000, description="EM steps each start runs before the best is picked "
                               "(fewer where it converges first); not counted in fit.steps")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("batch_size must be a positive integer or 'full'")
        return value


class Spec(_Strict):
    """A whole probkit spec (docs/spec.md)."""

    probkit: Annotated[Literal[1], BeforeValidator(_not_yes_or_no)] = Field(description="spec format version")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]  # a folder name
    description: str = ""
    data: DataSpec
    constants: dict[str, Union[Int, Float]] = Field(default_factory=dict)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    latent: dict[str, Union[str, LatentSpec]] = Field(default_factory=dict)
    define: dict[str, Union[str, Float]] = Field(
        default_factory=dict, description="named expressions (name -> expression, in order) of params, latents, "
        "x and earlier names, usable in the likelihood: a deep likelihood reads as layers")
    likelihood: LikelihoodSpec
    fit: FitSpec = Field(default_factory=FitSpec)


class SourceMap:
    """Positions of keys and values in the YAML text, so any error can name its line."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text
        self.values: dict[KeyPath, Location] = {}
        self.keys: dict[KeyPath, Location] = {}
        self.plain: dict[KeyPath, bool] = {}

    def where(self, path: KeyPath, *, key: bool = False) -> str:
        """`file:line:col` of the deepest known prefix of path."""
        for cut in range(len(path), -1, -1):
            prefix = tuple(path[:cut])
            # a mapping or list "is" where its key is written; a scalar where its value is
            table = self.keys if key or prefix not in self.plain else self.values
            if prefix in table:
                line, col = table[prefix]
                return f"{self.file}:{line}:{col}"
            if prefix in self.values:
                line, col = self.values[prefix]
                return f"{self.file}:{line}:{col}"
        return f"{self.file}:1:1"

    def expression_where(self, path: KeyPath, lineno: int, col_offset: int) -> str:
        """Position of a character inside an expression-valued scalar."""
        if path not in self.values:
            return self.where(path)
        line, col = self.values[path]
        quote = 0 if self.plain.get(path, True) else 1
        if lineno == 1:
            return f"{self.file}:{line}:{col + quote + col_offset}"
        return f"{self.file}:{line + lineno - 1}:{col_offset + 1}"


def dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def suggest(word: str, choices) -> str:
    """A ' did you mean ...?' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


MAX_YAML_NODES = 20_000  # a spec has a few hundred; aliases (*name) could otherwise expand without bound
MAX_YAML_DEPTH = 40  # nesting of mappings and lists


def _node_to_python(node, loader, path: KeyPath, smap: SourceMap, budget: list[int] | None = None):
    start = node.start_mark
    budget = budget if budget is not None else [MAX_YAML_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError(
            f"{smap.file}:{start.line + 1}:{start.column + 1}: the spec expands to more than {MAX_YAML_NODES:,} "
            "YAML values (each alias *name repeats all that its anchor &name holds); write the values out or "
            "use fewer aliases")
    if len(path) > MAX_YAML_DEPTH:
        raise SpecError(f"{smap.file}:{start.line + 1}:{start.column + 1}: the spec nests mappings or lists more "
                        f"than {MAX_YAML_DEPTH} levels deep; a spec needs a handful")
    smap.values[path] = (start.line + 1, start.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            # a key is the name as written: YAML 1.1 would read `on`, `no`, `yes` ... as booleans
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else loader.construct_object(key_node)
            if not isinstance(key, (str, int)):
                raise SpecError(
                    f"{smap.file}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: "
                    f"keys must be plain names, found {key!r}"
                )
            key = str(key)
            child = path + (key,)
            if key in out:
                raise SpecError(
                    f"{smap.file}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: "
                    f"{dotted(child)}: duplicate key '{key}'; each key may appear once"
                )
            smap.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _node_to_python(value_node, loader, child, smap, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(item, loader, path + (i,), smap, budget) for i, item in enumerate(node.value)]
    smap.plain[path] = node.style in (None, "")
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, file: str = "<spec>") -> tuple[Any, SourceMap]:
    """YAML text -> (plain Python data, SourceMap); malformed YAML raises SpecError."""
    smap = SourceMap(file, text)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here already
        node = loader.get_single_node()
        if node is None:
            raise SpecError(f"{file}:1:1: the spec is empty; it needs at least probkit, name, data, likelihood")
        data = _node_to_python(node, loader, (), smap)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. a control character
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        character = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise SpecError(f"{file}:{line}:{column}: the spec holds the character {character!r} (code "
                        f"{ord(character)}), which YAML does not allow; delete it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else f"{file}:1:1"
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise SpecError(f"{where}: malformed YAML: {detail}") from None
    except RecursionError:  # the YAML parser itself recurses once per level of nesting
        raise SpecError(f"{file}:1:1: the spec nests mappings or lists too deeply to read (a spec needs a "
                        "handful of levels)") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise SpecError(f"{file}:1:1: a spec is a mapping of keys (probkit, name, data, ...), found {type(data).__name__}")
    return data, smap


def _model_at(path: KeyPath):
    """The pydantic model class that validates the mapping at path (for 'did you mean')."""
    model: Any = Spec
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return None
        if part in fields:
            annotation = fields[part].annotation
            model = _unwrap(annotation)
        elif model is Spec:
            return None
        else:
            return None
        if model is None:
            return None
    return model


def _unwrap(annotation):
    """dict[str, ParamSpec] -> ParamSpec; Optional/Union[...] -> the BaseModel inside."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _model_path(loc: tuple) -> KeyPath:
    """Pydantic loc -> our key path, dropping union branch labels like 'LatentSpec' or 'str'."""
    models = {name for name, value in globals().items()
              if isinstance(value, type) and issubclass(value, BaseModel)}
    out = []
    for part in loc:
        if isinstance(part, str) and (part in models or part in ("str", "int", "float", "tuple[int, int]")):
            continue
        if isinstance(part, str) and part.startswith(("literal[", "function-", "tuple[")):
            continue
        out.append(part)
    return tuple(out)


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _translate(exc: ValidationError, smap: SourceMap) -> SpecError:
    lines = []
    seen = set()
    models = {name for name, value in globals().items() if isinstance(value, type) and issubclass(value, BaseModel)}
    for err in exc.errors():
        if "str" in err["loc"] and isinstance(err.get("input"), dict):
            continue  # the mapping branch of `str | Mapping` says what is wrong
        branch = {part for part in err["loc"] if isinstance(part, str)}
        if isinstance(err.get("input"), dict) and any(part.startswith("literal[") for part in branch):
            continue  # the same for `'word' | Mapping`
        if err["type"] == "model_type" and branch & models:
            continue  # a union's mapping branch refusing a word or number: the other branch says why
        path = _model_path(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            key = path[-1]
            parent = path[:-1]
            model = _model_at(tuple(p for p in parent if not _is_dynamic(parent, p)))
            allowed = list(model.model_fields) if model else []
            msg = (
                f"{smap.where(path, key=True)}: {dotted(path)}: unknown key '{key}'"
                f"{suggest(key, allowed)} (expected one of: {', '.join(allowed)})"
            )
            if any(ch in str(key) for ch in "()=*"):
                msg += ("; a comma inside {...} splits an expression in two: quote it, "
                        "e.g. prior: \"Beta(2.0, 2.0)\", or write the mapping in block style")
        elif kind == "missing":
            msg = f"{smap.where(path[:-1])}: {dotted(path)}: required key '{path[-1]}' is missing"
        else:
            found = _describe(err.get("input"))
            expected = err["msg"].replace("Value error, ", "").replace("Input should be", "expected")
            guess = ""
            if kind == "literal_error":
                options = err.get("ctx", {}).get("expected", "").replace("'", "").split(" or ")
                guess = suggest(err.get("input"), options)
            msg = f"{smap.where(path)}: {dotted(path)}: {expected}; found {found}{guess}"
        if msg not in seen:
            seen.add(msg)
            lines.append(msg)
    # a union of str | LatentSpec reports both branches; the first lines are the informative ones
    return SpecError("\n".join(lines[:6]))


def _is_dynamic(parent: KeyPath, part) -> bool:
    """Names the user chose (param and latent names) are not schema fields."""
    index = parent.index(part)
    return index > 0 and parent[index - 1] in ("params", "latent", "constants", "define")


class LoadedSpec:
    """A validated spec with its source map and the folder relative paths start from."""

    def __init__(self, spec: Spec, smap: SourceMap, base_dir: Path, text: str):
        self.spec = spec
        self.smap = smap
        self.base_dir = base_dir
        self.text = text

    @property
    def name(self) -> str:
        return self.spec.name

    def where(self, path: KeyPath) -> str:
        return self.smap.where(path)

    def latents(self) -> dict[str, LatentSpec]:
        return {
            name: (LatentSpec(dist=value) if isinstance(value, str) else value)
            for name, value in self.spec.latent.items()
        }


def _check_held_out_rule(data: dict, smap: SourceMap) -> None:
    """data.test and data.test_fraction are two ways to say which images are held out: refused
    together at test's line (DataSpec refuses them too, where no line is known)."""
    block = data.get("data")
    if isinstance(block, dict) and "test" in block and "test_fraction" in block and block["test"] is not None:
        raise SpecError(f"{smap.where(('data', 'test'), key=True)}: data.test: give either test (named held-out "
                        "images) or test_fraction (held out at random), not both; delete one")


def spec_from_text(text: str, file: str = "<spec>", base_dir: Path | None = None) -> LoadedSpec:
    """Parse and validate spec text; structural errors raise SpecError naming the line."""
    data, smap = parse_yaml(text, file)
    _check_held_out_rule(data, smap)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, smap) from None
    return LoadedSpec(spec, smap, base_dir or Path.cwd(), text)


MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; /dev/zero or a data file given by mistake is not


def read_spec(path: str | Path) -> LoadedSpec:
    """Read a spec file (structure only; `probkit.compiler.compile_spec` checks the maths)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # reading a pipe or a device would block
            raise SpecError(f"{path}: not a spec file (a pipe, a device or a socket); give the path of a .yaml file")
        with path.open("rb") as stream:
            raw = stream.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: the spec file is larger than {MAX_SPEC_BYTES:,} bytes; a spec is a few hundred "
                        "bytes, so this is probably not one")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(f"{path}:{line}:{column}: the spec is not UTF-8 text (byte 0x{raw[exc.start]:02x}); save "
                        "it as UTF-8") from None
    return spec_from_text(text, str(path), path.resolve().parent)
