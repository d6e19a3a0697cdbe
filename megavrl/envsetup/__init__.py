"""Environment set-up helpers run by the Makefile (not imported by the package at run time)."""
