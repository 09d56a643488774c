"""What the training scripts (train_glue.py, train_math.py, train_instruct.py) are built from, one idea per file.

Both scripts: training.py (how a run fails, flags, run folders, the optimiser step, data parallelism) and
adapters.py (the --method switch). GLUE: glue_data.py, glue_metrics.py, glue_model.py, glue_table.py, costs.py.
Causal-LM fine-tuning (math and instructions): causal_lm.py (the one training loop), checkpoint.py,
generation.py. Math: math_data.py, math_scoring.py. Instructions: instruct_data.py (Cleaned Alpaca), mt_bench.py.
Imports flow one way: the scripts import these
modules, these import pretrained/, projections.py and unilora.py, and none imports a script.
"""
