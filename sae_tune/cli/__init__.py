"""The ``sae-tune`` command line (click): one module per group of commands, ``main.py`` joins them."""
