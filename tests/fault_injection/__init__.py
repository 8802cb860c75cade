"""Fault-injection suite: run ``PYTHONPATH=src python -m tests.fault_injection`` for the whole table."""
