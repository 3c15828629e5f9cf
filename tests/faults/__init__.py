"""Fault-injection tests: the rows of the fault plan, and the harness they stand on."""
