"""The vault: objects encrypted at rest (format.py) under a master key (keys.py).

Access control, the audit log and the encrypted model store that the runtime
opens models through are issue #4's remaining parts; see FORMAT.md for the file
format.
"""
