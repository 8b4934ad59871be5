"""MTEB-style evaluation on local files; takes any object with ``.encode``."""
