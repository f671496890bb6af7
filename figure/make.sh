#!/usr/bin/env bash
# Regenerates every figure in figure/ with the current code, on whatever machine runs it (about 7 minutes
# on a 2-core CPU): the README's three commands with --figures figure (their checkpoints go to
# outputs/figure-run/, never over yours), then the shipped adapters' comparisons, sweep and stack.
set -euo pipefail
cd "$(dirname "$0")/.."
run=outputs/figure-run
python train.py --out "$run/model.pt" --force --figures figure
python lora_finetune.py --base "$run/model.pt" --out "$run/bold.pt" --force --figures figure
python denoise.py --ckpt "$run/model.pt" --figures figure
python denoise.py --ckpt "$run/model.pt" --lora "$run/bold.pt" --compare --process '' --figures figure
for style in italic inverted; do
  python denoise.py --ckpt pretrained/model.pt --lora "pretrained/$style.pt" --compare --process '' --figures figure
done
python denoise.py --ckpt pretrained/model.pt --lora pretrained/italic.pt --sweep --process '' --figures figure
python denoise.py --ckpt pretrained/model.pt --lora pretrained/bold.pt pretrained/italic.pt --process '' --figures figure
