"""Advanced tests: edge cases, gradients, dtypes, devices, numerics against published references and
training outcomes, every stage (L14: `pytest testcases/advanced_test.py`).

The tests live in each stage's own module, testcases/stage<N>/advanced.py; this file collects them
all (testcases/collect.py). Same markers and points table as basic_test.py.
"""

from testcases.collect import stage_tests

globals().update(stage_tests("advanced"))
