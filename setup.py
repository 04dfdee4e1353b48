"""The package list of the egressd wheel; everything else is in pyproject.toml.

Packages are discovered (setuptools `find_packages`, the same discovery as pyproject's
`[tool.setuptools.packages.find]`) rather than listed: `proxy` and `plugins` always, and
`fakes` and `demo` when the source tree has them. A checkout has them, so `pip install .`
installs them and `egressd demo` works; the Docker build stage copies only pyproject.toml,
README.md, setup.py, proxy/, plugins/ and policies/, so the image's wheel has neither.

`proxy.examples` (the example policies, policies/ mapped by pyproject's `package-dir`) is
added by name: discovery only finds packages inside the tree it searches, which is why this
list lives here and not in a `[tool.setuptools.packages.find]` table.
"""

from setuptools import find_packages, setup

INCLUDE = ["proxy", "proxy.*", "plugins", "plugins.*", "fakes", "fakes.*", "demo", "demo.*"]

setup(packages=[*find_packages(include=INCLUDE), "proxy.examples"])
