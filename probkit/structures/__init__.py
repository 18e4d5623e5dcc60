"""How a likelihood's pixels depend on each other, and what follows from it.

`dependency` decides, from the expression tree alone, which pixels of x each argument of the
likelihood may read: the static proof that an autoregressive likelihood is a density.
"""
