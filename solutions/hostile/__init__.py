"""Hostile submissions: what a student file could do to the grader, and the score each must get.

``python -m solutions.tools.hostile`` grades every case with the isolated grader
(testcases/grade.py) and checks its scores and its time; ``make test`` runs it.
"""
