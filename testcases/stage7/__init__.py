"""Stage 7's graded tests (collected by testcases/basic_test.py and testcases/advanced_test.py)."""
