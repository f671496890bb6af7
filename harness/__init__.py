"""The harness: everything the scripts need around the lesson in model/, and nothing the lesson needs.

    config.py    every setting of a run in a dataclass, and the cpu and gpu presets
    cli.py       the command line: flags the scripts share, devices, seeds, one-line errors
    files.py     checkpoints, adapter files and resume files, written atomically with a checksum
    runs.py      a training run around its loop: progress, saves, Ctrl-C, an exact resume
    sampling.py  a checkpoint (with any adapters) to digits: the preset's sampler, seeded batches
    metrics.py   class accuracy, FID and the style metrics, through an MNIST classifier
    figures.py   digit grids and loss curves

It imports from model/; nothing in model/ imports from here (tests/test_layers.py checks).
"""
