"""Basic tests: the behaviour each lesson asks for, every stage (L14: `pytest testcases/basic_test.py`).

The tests live in each stage's own module, testcases/stage<N>/basic.py; this file collects them
all (testcases/collect.py). Run one exercise with ``make grade EX=1.2`` or
``pytest testcases/basic_test.py --ex 1.2``; the points table is testcases/manifest.py.
"""

from testcases.collect import stage_tests

globals().update(stage_tests("basic"))
