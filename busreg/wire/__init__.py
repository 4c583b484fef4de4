"""The wire contract: event, delta and snapshot models, their encodings, signing, routing.

Pure, no I/O. May import: ``busreg.constants``, ``busreg.errors``, ``busreg.settings``.
"""
