"""Tools, not the library: nothing in the library imports them. bench.py measures cost (python -m tools.bench),
experiments.py trains and compares models on the shapes set (python -m tools.experiments), compare_outputs.py
checks that a change of the code leaves every model's outputs as they were (python -m tools.compare_outputs)."""
