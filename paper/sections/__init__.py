"""The report's sections, one module each; paper/plan.py lists them in order (``SECTIONS``)."""
