"""Stage 6's graded tests (collected by testcases/basic_test.py and testcases/advanced_test.py)."""
