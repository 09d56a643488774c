"""What the training scripts (train_glue.py, train_math.py) are built from, one idea per file; see each file."""
