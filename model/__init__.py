"""mnist-lora-diffusion, the lesson: a conditional diffusion model and a hand-written LoRA, in miniature.

Read it in this order, one chapter per file:

    data.py        MNIST through torchvision, as one tensor on the device; shuffled batches
    diffusion.py   the noise schedule, the forward process, the loss, the samplers (DDPM, DDIM), guidance
    attention.py   cross-attention from pixels to the digit label: the label's way in
    norm.py        GroupNorm kept in bf16 under autocast (a faster sampler)
    unet.py        the noise-prediction network eps_theta(x_t, t, y), a small UNet
    dit.py         the same network as a Diffusion Transformer: patches, adaLN-Zero, three ways in for the label
    ema.py         an exponential moving average of the weights, which samples
    training.py    one training step: loss, backward, clip, optimizer step, EMA
    styles.py      the styles a LoRA adapter learns: bold, italic, inverted
    lora.py        low-rank adaptation of a linear or conv layer (LoRA, LoCon, rsLoRA)
    dora.py        DoRA: a learned magnitude beside LoRA's direction
    lowrank.py     full fine-tuning as an adapter; the spectrum of its update; a LoRA cut from it by SVD
    adalora.py     AdaLoRA: the update as an SVD, importance scores, a falling rank budget
    adapters.py    adapters put into a model: targets, on/off, blending, stacking, merging, LoRA+
    controls.py    the shapes a ControlNet follows: skeleton, edges, sketch
    controlnet.py  a ControlNet: the locked UNet steered by a trainable copy of its encoder, zero convs
    quant.py       QLoRA's 4-bit base: NF4, blockwise absmax, double quantisation, 4-bit layers

Nothing here imports the harness (harness/: presets, command line, files, metrics, figures).
"""
