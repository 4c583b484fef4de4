"""Operator tools: the ``busreg`` CLI, status, dead letters, namespace admin, the demo.

Top layer: may import any package; no library package imports it.
"""
