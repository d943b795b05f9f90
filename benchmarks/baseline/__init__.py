"""Verbatim copies of the diagnostics modules as they were before the speed work.

``bench_overhead.py`` runs them next to the current code so that every "before" and
"after" number comes from the same run on the same machine. Not part of the package.
"""
