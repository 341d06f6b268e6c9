"""What the notebooks show: one module per notebook topic draws its figures and builds its tables,
so that every notebook cell stays a few lines of calls (``tests/test_notebooks.py`` counts them)."""
