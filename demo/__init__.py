"""`egressd demo`: a self-contained demonstration of egressd against the fakes, on loopback.

Not part of the product package: a `pip install .` from a checkout installs it beside
`proxy` (so `egressd demo` works), the container image does not. `demo.run` is part 1 and
the report, `demo.blackfriday` the Black-Friday simulation (part 2), `demo.html` the
`--html` report. See README.md.
"""
