"""Issue 13's experiment plan (grid), its runner and its report; the command line is scripts/ablations.py."""
