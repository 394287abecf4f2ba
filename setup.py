"""The package list: every graphc* package, plus the top-level templates/ folder shipped
inside the package as graphc.templates (the code generators render them at compile time).
Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["graphc", "graphc.*"]) + ["graphc.templates"],
      package_dir={"graphc.templates": "templates"})
