"""The tasks: what probkit does with a fitted model, one module each, as peers.

A task (sample, complete, evaluate, compress / decompress, denoise, upscale, cluster)
receives an opened run from `probkit.session` (`open_run`, `prepare`, `check_run_data`,
`input_levels`, ...) and works over the compiled model's public interface — `compiled.joint`
(the latent, likelihood and log-joint tables, the marginal), `compiled.structure` (how the
pixels depend on each other: its tables, pixel stepper and exact completion),
`compiled.family` (the likelihood family's capabilities) and `compiled.program` (the Pyro
program) — never another task's private helpers. What several tasks share (the files they
write, the limits on what they are asked, the Gaussian posteriors) lives in a module of its
own here. `probkit.api` re-exports each task's entry point.
"""
