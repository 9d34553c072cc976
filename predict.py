"""Prediction on new photos: not yet implemented (tracked in the prediction issue)."""

import sys

if __name__ == "__main__":
    sys.exit(
        "predict.py is not implemented yet: train with train.py; prediction, evaluation, "
        "scanning and export arrive with the 'Predict, evaluate, scan whole photos, export' issue."
    )
