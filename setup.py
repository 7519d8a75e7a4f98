"""Keeps the unit tests that sit beside their modules (``*_test.py``, ``conftest.py``) out of
the wheel, and so out of the image, which installs the wheel. Everything else about the
build is in pyproject.toml; pyproject alone cannot do this: its exclusions act on packages
and data files, never on a package's own modules."""

from setuptools import setup
from setuptools.command.build_py import build_py


def is_test(module: str) -> bool:
    return module.endswith("_test") or module == "conftest"


class BuildPyWithoutTests(build_py):
    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir)
                if not is_test(m[1])]


setup(cmdclass={"build_py": BuildPyWithoutTests})
