"""How a param enters an argument of a distribution: one parser for every reader.

The data-driven starts (probkit.initialise) and EM (probkit.infer.em) both need to know
whether an argument is a param used plainly — by name, indexed by latents, or broadcast by
`ones(...)` — and which latents index it. `param_use` reads one argument's expression tree
and says so; each reader then takes the forms it can use:

=========================  ==========================================  ========  =====
form                       result                                      starts    EM
=========================  ==========================================  ========  =====
`p`                        ParamUse("p")                               yes       yes
`p[z]`, `p[y, z]`          ParamUse("p", index=("y", "z"))             yes       yes
`p[z, z]` (a diagonal)     ParamUse(..., index=("z", "z")), repeated   yes       no
`p[()]` (no index)         ParamUse("p", empty_index=True)             no        yes
`p * ones(D)`, `ones * p`  ParamUse(..., broadcast=True)               no        yes
`p + 1`, `p[0]`, `exp(p)`  NotPlain: params through an expression      no        no
`2.0 * ones(D)`            None: no param                              --        --
=========================  ==========================================  ========  =====

An index must name latents the caller lists (EM lists, for a latent's own arguments, only
the latents before it); any other index (a number, a later latent, an expression) makes the
use NotPlain.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class ParamUse:
    """A param used plainly: `param`, `param[a, b]` (every index a latent's name), or either
    times `ones(...)`.

    index: the latents' names in the param's own index order; text: the use as written
    without the `* ones(...)` (ast.unparse); empty_index: written `param[()]`, brackets
    around no index (the whole param); broadcast: times `ones(...)`, so one value of the
    param serves every entry along the dimensions `ones` adds."""

    param: str
    index: tuple[str, ...] = ()
    text: str = ""
    empty_index: bool = False
    broadcast: bool = False

    @property
    def repeated(self) -> bool:
        """Whether the index names one latent twice (`p[z, z]`: the param's diagonal)."""
        return len(set(self.index)) != len(self.index)


@dataclass(frozen=True)
class NotPlain:
    """An argument that uses params through an expression (`p + 1`, `p[0]`, `exp(p)`)."""

    params: tuple[str, ...]
    text: str

    def __str__(self) -> str:
        return f"`{self.text}` uses {', '.join(self.params)} through an expression"


def param_use(node: ast.AST, params: Collection[str], latents: Collection[str]) -> ParamUse | NotPlain | None:
    """How the params (names) enter the argument `node`: a ParamUse when one param is used
    plainly, indexed only by names in `latents`; NotPlain when params enter otherwise; None
    when the argument uses no param."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        for this, other in ((node.left, node.right), (node.right, node.left)):
            if isinstance(other, ast.Call) and isinstance(other.func, ast.Name) and other.func.id == "ones":
                use = param_use(this, params, latents)
                if isinstance(use, ParamUse):
                    return ParamUse(use.param, use.index, use.text, use.empty_index, broadcast=True)
                return use
    if isinstance(node, ast.Name) and node.id in params:
        return ParamUse(node.id, text=node.id)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in params:
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if all(isinstance(part, ast.Name) and part.id in latents for part in parts):
            return ParamUse(node.value.id, tuple(part.id for part in parts), ast.unparse(node),
                            empty_index=not parts)
    used = tuple(sorted(set(params) & {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}))
    return NotPlain(used, ast.unparse(node)) if used else None
