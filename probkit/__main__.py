"""`python -m probkit` runs the command-line interface."""

from probkit.cli import app

app(prog_name="probkit")
