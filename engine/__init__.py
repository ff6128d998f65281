"""What the entry points (train.py, detect.py) share, below them: the model registry, checkpoint files,
device choice and the command-line runner (runtime.py), the shapes backbone's pretraining (pretrain.py)
and the pictures (visualize.py). Nothing here imports an entry point."""
