"""The paper's plan and report (driven by reproduce.py; not part of the installed package)."""
