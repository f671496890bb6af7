"""Chapter 2: fine-tune the trained model with LoRA on the cross-attention projections.

    python lora_finetune.py                         # base: checkpoints/model.pt -> checkpoints/lora.pt
    python lora_finetune.py --rank 4 --max-steps 500

Loads the base model (its averaged weights, the ones we sample with), swaps the attention layers' w_q,
w_k and w_v for LoraLayers (model/lora.py), freezes everything else and keeps training on MNIST with only
the adapter in the optimizer. The output file holds only the adapter: its tensors (averaged, as for the
base), its config (rank, alpha, targets), the base model's fingerprint, and the state needed to --resume.
"""
import os
import time

import torch

from model.checkpoint import fingerprint, load_model
from model.cli import (Parser, UserError, check_writable, fraction, pick_device, positive_float, positive_int,
                       run_cli, seed_everything)
from model.data import load_mnist
from model.ema import EMA
from model.figures import save_loss_curve
from model.lora import inject_lora, load_lora, lora_state_dict, parameter_report, save_lora
from model.trainer import fit, plan_steps


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--base", default="checkpoints/model.pt", help="trained model checkpoint (train.py --out)")
    p.add_argument("--out", default="checkpoints/lora.pt", help="adapter file to write (and to --resume)")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha; the update is scaled by alpha / r")
    p.add_argument("--dropout", type=fraction, default=0.0, help="dropout on the adapter's input")
    p.add_argument("--targets", default="w_q,w_k,w_v", help="names of the nn.Linear layers to adapt")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (torchvision's layout)")
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the training images")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps in all")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate of the adapter (AdamW)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="images per optimizer step")
    p.add_argument("--ema-decay", type=fraction, default=0.999,
                   help="cap on the decay of the adapter's moving average; below it the decay is (1+k)/(10+k) at "
                        "step k, which reaches 0.999 only at step 8,990 (model/ema.py)")
    p.add_argument("--p-uncond", type=fraction, default=0.1, help="null-label probability, as in training")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for the adapter's init, data order and noise")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning saved at --out")
    p.add_argument("--figures", default="figure", help="folder for loss_lora.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    check_writable(args.out)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())

    model, diffusion, _ = load_model(args.base, device, weights="ema")
    base_fp = fingerprint(model)
    if args.resume:
        if not os.path.exists(args.out):
            raise UserError(f"--resume: no adapter at {args.out} to continue from")
        adapter = load_lora(model, args.out, device)  # the averaged adapter, checked against the base
        ema = EMA(model, args.ema_decay)
        state = adapter["train_state"]
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, t in state["tensors"].items():
                params[name].copy_(t)  # the live adapter, from which training continues
        config, step, losses, seconds = adapter["config"], adapter["step"], state["losses"], state["seconds"]
        print(f"resuming {args.out} at step {step}")
    else:
        config = dict(r=args.rank, alpha=args.alpha, targets=list(targets), dropout=args.dropout)
        inject_lora(model, targets, args.rank, args.alpha, args.dropout)
        ema = EMA(model, args.ema_decay)
        step, losses, seconds, state = 0, [], 0.0, None

    trainable, total = parameter_report(model)
    print(f"LoRA r={config['r']} alpha={config['alpha']:g} on {','.join(config['targets'])}: "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    images, labels = load_mnist(args.data_dir, train=True, device=device)
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapter_params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    total_steps = plan_steps(len(images), args.batch_size, args.epochs, args.max_steps)

    start = time.time()

    def save(at_step, at_losses):
        train_state = dict(tensors=lora_state_dict(model), optimizer=optimizer.state_dict(),
                           losses=at_losses, seconds=seconds + time.time() - start)
        save_lora(args.out, ema.model, config, base_fp, at_step, extra=dict(train_state=train_state))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = fit(model, diffusion, images, labels, optimizer, ema, total_steps=total_steps,
                 batch_size=args.batch_size, lr=args.lr, warmup=50, p_uncond=args.p_uncond, seed=args.seed,
                 start_step=step, losses=losses, save=save, desc="lora")
    elapsed = time.time() - start
    print(f"fine-tuned {total_steps - step} steps in {elapsed:.1f} s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
    base_size, lora_size = os.path.getsize(args.base), os.path.getsize(args.out)
    weights = sum(t.numel() * t.element_size() for t in lora_state_dict(model).values())
    print(f"adapter: {args.out} {lora_size / 1024:,.0f} KiB ({weights / 1024:,.0f} KiB of adapter weights, "
          f"the rest resume state); base checkpoint: {args.base} {base_size / 2**20:,.1f} MiB")
    if losses:
        os.makedirs(args.figures, exist_ok=True)
        save_loss_curve(os.path.join(args.figures, "loss_lora.png"), losses, title="LoRA fine-tuning loss")
    return dict(seconds=elapsed, trainable=trainable, total=total, lora_bytes=lora_size, base_bytes=base_size)


if __name__ == "__main__":
    run_cli(main)
