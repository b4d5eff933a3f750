"""Plumbing, the lowest layer: one-line user errors (`errors`), atomic writes and config files (`io`), validated
config fields (`fields`), the run log (`logs`), torch threads and kernels (`threads`, `kernels`), and the old
module names' finder (`moved`). May import nothing from route (the standard library and third-party packages only)."""
