"""The library the numbered steps tell their story with: one concern a module, small functions that take their
AWS clients as arguments. `common.py`, beside the steps, holds configuration, clients, errors and exit codes."""
