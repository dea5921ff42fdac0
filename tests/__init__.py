"""The test suite (a package, so that `tests.conftest` is ours and not the `tests` package that
iterative-stratification installs into site-packages)."""
