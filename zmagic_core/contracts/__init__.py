"""Layer 0, the contracts: component interfaces, plugin hook specs and error types.

Everything else implements or raises these; this package imports only torch and pluggy.
"""
