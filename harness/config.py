"""Run configurations: every setting of a run in one dataclass, and the two presets that fill them in.

    TrainConfig   what train.py runs: the network's size and the optimisation (saved in the checkpoint)
    LoraConfig    what lora_finetune.py runs: the adapter and its optimisation (saved beside the adapter)
    ControlConfig what controlnet_train.py runs: the control and the optimisation (saved in the ControlNet file)
    SampleConfig  how denoise.py and evaluate.py sample by default

A *preset* is one of each, sized for a machine. `cpu` is the design point: a 2-core laptop-class CPU, on
which the three scripts finish in minutes. `gpu` is the full-size run for one CUDA GPU. train.py picks the
preset from the device (`--preset auto`) and records its name in the checkpoint; lora_finetune.py and
denoise.py then follow the checkpoint's preset. Any flag given on the command line wins over the preset.
Each preset trains a UNet (`train`) or, with `--backbone dit`, a Diffusion Transformer (`dit`), and
fine-tunes with a LoRA (`lora`), or with `--variant full` or `--variant adalora` at their own settings.
"""
from dataclasses import dataclass, fields, replace

from model.dit import DiT
from model.unet import UNet


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "unet"            # the network: the UNet (model/unet.py) or a Diffusion Transformer (dit.py)
    channels: tuple = (64, 128, 128)  # UNet widths at 28x28, 14x14, 7x7
    attn_levels: tuple = (1, 2)       # levels with cross-attention (0 = 28x28); the middle always has it
    patch: int = 4                    # DiT patch size: (28 / patch)^2 tokens
    width: int = 64                   # DiT token width
    depth: int = 4                    # DiT blocks
    label_in: str = "adaln-zero"      # the DiT's way in for the label: adaln-zero, cross-attn or in-context
    T: int = 1000                     # diffusion steps
    epochs: int = 12                  # passes over the training images: the learning-rate schedule's length
    total_steps: int = 0              # optimizer steps in all, if set: overrides `epochs`
    batch_size: int = 512
    lr: float = 2e-3                  # peak learning rate (AdamW; linear warm-up, then cosine to lr/10)
    warmup: int = 200                 # warm-up steps
    ema_decay: float = 0.999          # cap on the EMA decay (ema.py)
    p_uncond: float = 0.1             # probability of the null label (classifier-free guidance)
    min_snr_gamma: float = 5.0        # Min-SNR-gamma loss weight; 0 = the plain DDPM loss
    t_sampling: str = "uniform"       # how training draws t: uniform, or logit-normal (diffusion.py)
    prediction: str = "eps"           # what the UNet predicts: the noise eps, or the velocity v (diffusion.py)
    seed: int = 0


@dataclass(frozen=True)
class LoraConfig:
    style: str = "bold"               # the data the adapter learns (styles.py); 'none' = plain MNIST
    variant: str = "lora"             # lora, dora, adalora or full (model/adapters.py)
    rank: int = 8                     # AdaLoRA: the average rank its layers end with
    init_rank: int = 0                # AdaLoRA: every layer's rank at the start (0: 1.5 x rank, as peft's 12 -> 8)
    alpha: float = 8.0                # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    rslora: bool = False              # rank-stabilised scaling alpha / sqrt(rank) (rsLoRA)
    targets: tuple = ("attn", "conv")  # layer groups or names to adapt (lora.py)
    dropout: float = 0.0
    epochs: int = 1
    total_steps: int = 0              # optimizer steps in all, if set: overrides `epochs`
    batch_size: int = 64
    lr: float = 2e-3                  # the learning rate of A (and of DoRA's magnitude)
    lr_ratio: float = 1.0             # LoRA+: B learns at lr_ratio x lr; 1 = plain LoRA
    warmup: int = 50
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    min_snr_gamma: float = None       # None: the base model's (an adapter trains on its base's objective)
    seed: int = 0
    prune_window: tuple = (0.2, 0.8)  # AdaLoRA: the shares of the run between which the ranks fall
    prune_every: int = 10             # AdaLoRA: steps between two maskings
    orth_weight: float = 0.1          # AdaLoRA: weight of the orthogonality penalty


def starting_rank(config):
    """The rank of an adapter's tensors (config: a LoraConfig's dict): AdaLoRA starts wider than it ends."""
    if config.get("variant") != "adalora":
        return int(config["rank"] if "rank" in config else config["r"])  # files before 'rank' said 'r'
    return int(config.get("init_rank") or config["rank"] * 3 // 2)


# A DiT has no convolutions: its adapters take the attention (projections and output) and the MLPs.
DIT_LORA_TARGETS = ("attn", "w_o", "mlp")


@dataclass(frozen=True)
class ControlConfig:
    control: str = "skeleton"         # what the ControlNet follows: edges, skeleton or sketch (model/controls.py)
    train_copy: bool = True           # train the copy of the encoder; False: only the hint and the zero convs
    epochs: int = 1
    total_steps: int = 0              # optimizer steps in all, if set: overrides `epochs`
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    p_uncond: float = 0.5             # the paper's recipe: half the labels become the null label
    min_snr_gamma: float = None       # None: the base model's
    seed: int = 0


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50                   # DDIM steps
    eta: float = 0.0                  # DDIM noise: 0 deterministic, 1 a fresh draw each step as in DDPM
    guidance: float = 1.5             # classifier-free guidance scale
    guidance_interval: str = "auto"   # steps where guidance acts: auto (sigma in (0.28, 5.42]), all, or FIRST,LAST
    batch_size: int = 1000            # digits sampled at once


# Full fine-tuning moves every weight by about the learning rate each Adam step, so it runs far below an
# adapter's rate, whose B A starts from zero. AdaLoRA's update grows only through lambda (P and Q are held
# near orthonormal), about the learning rate a step: a larger alpha lets it reach a LoRA's size (docs/lowrank.md).
FULL_LR = 1e-3
ADALORA_ALPHA = 96.0

PRESETS = {
    "gpu": dict(train=TrainConfig(),
                dit=TrainConfig(backbone="dit", patch=2, width=256, depth=8, t_sampling="logit-normal"),
                lora=LoraConfig(epochs=3, batch_size=512), full=LoraConfig(variant="full", epochs=3, batch_size=512, lr=FULL_LR),
                adalora=LoraConfig(variant="adalora", alpha=ADALORA_ALPHA, epochs=3, batch_size=512),
                control=ControlConfig(epochs=3),
                sample=SampleConfig(), dit_sample=SampleConfig()),
    # The small model trains for one epoch. It draws the middle steps, where a digit takes shape, more often
    # (logit-normal t), warms up longer to steady its first steps, and reads the label at 7x7 and in the
    # middle only: attention at 14x14 cost time and bought nothing measurable (docs/cpu.md).
    "cpu": dict(train=TrainConfig(channels=(16, 32, 64), attn_levels=(2,), epochs=1, batch_size=32, lr=4e-3,
                                  warmup=200, t_sampling="logit-normal"),
                # The DiT is cheaper per image than the UNet but needs more steps (docs/dit.md).
                dit=TrainConfig(backbone="dit", patch=4, width=64, depth=4, total_steps=7500, batch_size=32,
                                lr=2e-3, warmup=200, t_sampling="logit-normal"),
                lora=LoraConfig(total_steps=500, batch_size=32, lr=4e-3),
                full=LoraConfig(variant="full", total_steps=500, batch_size=32, lr=FULL_LR),
                adalora=LoraConfig(variant="adalora", alpha=ADALORA_ALPHA, total_steps=500, batch_size=32, lr=4e-3),
                control=ControlConfig(total_steps=1500, batch_size=32, lr=2e-3),
                # The small model needs guidance on the noisiest steps too: from t = 82 (sigma 0.28) to the top.
                # Fresh noise at every step (eta 1) undoes some of the small model's errors, so less guidance
                # reaches the same class accuracy, and the digits vary more (docs/cpu.md).
                sample=SampleConfig(steps=20, eta=1.0, guidance=1.3, guidance_interval="82,999", batch_size=200),
                # The DiT reads the label less surely than the UNet after its minutes: more guidance (docs/dit.md).
                dit_sample=SampleConfig(steps=20, eta=1.0, guidance=3.0, guidance_interval="82,999", batch_size=200)),
}


def base_train_config(checkpoint):
    """The TrainConfig a base model was trained with (a base too old to record one used the plain loss and
    uniform t): what an adapter or a ControlNet trains on, so that it learns the base's objective."""
    return TrainConfig(**checkpoint["train"]) if "train" in checkpoint else TrainConfig(min_snr_gamma=0.0)


def objective_on(base, config):
    """train_step's objective for a run on top of the checkpoint `base`: this run's null-label rate and Min-SNR
    gamma, and the base's draw of t, which the base learned every step with."""
    return dict(p_uncond=config.p_uncond, min_snr_gamma=config.min_snr_gamma,
                t_sampling=base_train_config(base).t_sampling)


def preset_named(name):
    """The preset called `name` (a checkpoint records its own); an unknown name is a ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (this version knows {', '.join(PRESETS)}); the checkpoint may be "
                         "from another version: retrain it, or sample with --steps, --eta and --guidance given")
    return PRESETS[name]


def network(config):
    """A fresh, seeded-by-the-caller network for a TrainConfig: its backbone at its size."""
    if config.backbone == "dit":
        return DiT(patch=config.patch, width=config.width, depth=config.depth, label_in=config.label_in)
    return UNet(channels=config.channels, attn_levels=config.attn_levels)


def describe(config):
    """The network of a TrainConfig in a few words, for the scripts' first line."""
    if config.backbone == "dit":
        return f"DiT ({config.label_in}, patch {config.patch}, width {config.width}, depth {config.depth})"
    return f"UNet {','.join(map(str, config.channels))}"


def sample_config(checkpoint, device):
    """How a checkpoint samples by default: its preset's sampler for its backbone (a DiT has its own)."""
    preset = preset_named(checkpoint.get("preset") or preset_for(device))
    return preset["dit_sample"] if checkpoint.get("backbone") == "dit" else preset["sample"]


def preset_for(device):
    """'gpu' on a CUDA device, 'cpu' everywhere else (Apple's mps included: a laptop)."""
    return "gpu" if device.type == "cuda" else "cpu"


def with_flags(config, args):
    """`config` with every field that the command line set (not None in `args`) replaced by the flag's value."""
    given = {f.name: getattr(args, f.name) for f in fields(config) if getattr(args, f.name, None) is not None}
    return replace(config, **given)


def changed_fields(saved, config):
    """Names of the fields whose values differ between two configs of the same kind."""
    return [f.name for f in fields(config) if getattr(saved, f.name) != getattr(config, f.name)]


# On --resume these may change: they only extend the run that was saved. Any other change would mix two runs.
MAY_CHANGE_ON_RESUME = ("epochs", "total_steps")


def resumed_config(saved, args):
    """The saved run's config with the flags applied; refuses a flag that would change the run itself."""
    config = with_flags(saved, args)
    clash = [f for f in changed_fields(saved, config) if f not in MAY_CHANGE_ON_RESUME]
    if clash:
        flags = ", ".join(f"--{f.replace('_', '-')} (saved {getattr(saved, f)})" for f in clash)
        raise ValueError(f"--resume continues the saved run, which used other values: {flags}; "
                         "leave those flags out, or start a new run with --force")
    return config
