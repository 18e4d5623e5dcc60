"""Fitting theta: AutoDelta point estimates (MAP or MLE) by Adam or L-BFGS.

The pieces, one module each: the objective (what is minimised, fused or through Pyro's
TraceEnum_ELBO), the steppers (one optimiser step each), the batch plan (what each step
sees), checkpoint I/O, the evaluator, and the trainer's loop that ties them together. A
data-parallel strategy or a closed-form optimiser plugs in as another objective or stepper;
the families are never touched.
"""

from probkit.infer.batches import BatchPlan, BatchStream
from probkit.infer.checkpoint import fitted_spec_text, run_info, write_run
from probkit.infer.evaluation import Evaluator
from probkit.infer.objective import (
    Batch,
    CompiledLoss,
    FusedObjective,
    Params,
    PyroObjective,
    pyro_elbo,
)
from probkit.infer.steppers import AdamStepper, LBFGSStepper, NonFiniteLoss
from probkit.infer.trainer import FitResult, FitSettings, Trainer, settings_from

__all__ = [
    "AdamStepper", "Batch", "BatchPlan", "BatchStream", "CompiledLoss", "Evaluator", "FitResult", "FitSettings", "FusedObjective",
    "LBFGSStepper", "NonFiniteLoss", "Params", "PyroObjective", "Trainer", "fitted_spec_text", "pyro_elbo",
    "run_info", "settings_from", "write_run",
]
