"""Shared test helpers: tolerances, backend switches, the Triton interpreter monitor and ahead-of-time GPU compiles."""
