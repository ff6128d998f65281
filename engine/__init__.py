"""What the entry points (train.py, detect.py) share, below them: the model registry, checkpoint files,
device choice and the command-line runner (runtime.py), the shapes backbone's pretraining (pretrain.py),
a detector on image files and the threshold its pictures are drawn above (pictures.py), the pictures themselves
(visualize.py) and the curves of a run (curves.py). Nothing here imports an entry point."""
