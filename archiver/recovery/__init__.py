"""Finishing what a process left: the objects writers spool for it, and the start-up replay."""
