"""Placement as plugins: filters -> scorers -> picker per pool, and a decider for remote prefill.

Read base.py for the contracts, runner.py for how a profile runs, profiles/*.yaml for the
declarative profiles. Adding a plugin touches one new module (registered by name) and its test.
"""
