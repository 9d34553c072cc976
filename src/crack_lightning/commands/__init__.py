"""Every command's body, the only code that imports the command wrapper (`cli.py`).

Library modules below (data, models, training, inference, evaluation) never import from
here: commands read settings, call the libraries, and print.
"""
