"""Diffusion processes around the backbones (nothing here is imported eagerly; no torch on import).

- ``time_input``: continuous solver time → each backbone's time input (DiT, U-ViT, DiMR), shared by trainer and sampler.
- ``objectives``: ε-MSE, iDDPM's hybrid loss (learned σ), DiMR's multi-scale loss; ``labels``: label drop for CFG.
- ``discrete`` / ``gaussian``: DDPM posterior, Gaussian KL and discretized decoder likelihood.
- ``guidance``: classifier-free guidance wrapping a backbone into a solver's ``eps_fn``.
- ``setup``: build schedule, objective and guided ``eps_fn`` from a recipe; ``sections``: recipe validators.
- ``multiscale``: DiMR's multi-scale targets (DiMR engineer).
"""
