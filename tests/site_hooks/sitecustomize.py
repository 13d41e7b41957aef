"""Imported by Python at start-up when this folder is on PYTHONPATH (``fit_hooks.hook_env``).

A wrapper around run.py would reach only its own process; a sweep's launcher starts the trial
processes itself (joblib's workers), and they inherit the environment, so this file reaches them.
"""
import os
import sys

if os.environ.get("INAT_TEST_KILL_AFTER_EPOCH"):  # torch is imported only where a hook is asked for
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for fit_hooks
    import fit_hooks

    sys.path.pop(0)
    fit_hooks.register_from_env()
