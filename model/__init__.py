"""mnist-lora-diffusion: a conditional diffusion model and a hand-written LoRA, in miniature.

Read the package as a tutorial, one chapter per file:

    data.py        MNIST as one tensor on the device
    unet.py        the noise-prediction network (a small UNet)
    attention.py   cross-attention from pixels to the digit label
    norm.py        GroupNorm kept in bf16 under autocast (a faster sampler)
    diffusion.py   the noise schedule, the training loss and the samplers (DDPM, DDIM, guidance)
    ema.py         an exponential moving average of the weights
    config.py      every setting of a run in a dataclass, and the cpu and gpu presets
    trainer.py     the training loop shared by train.py and lora_finetune.py
    styles.py      the styles a LoRA adapter learns (bold, italic, inverted) and their metrics
    lora.py        low-rank adaptation of linear and conv layers (LoRA, LoCon), stacking, merging
    checkpoint.py  saving and loading models and adapters
    sampling.py    drawing digits from a checkpoint: seeded batches, bf16, the default guidance interval
    metrics.py     class accuracy and FID, the classifier they use, and the real-data floor
    figures.py     digit grids and loss curves
    cli.py         what the scripts share: devices, seeds and one-line errors
"""
