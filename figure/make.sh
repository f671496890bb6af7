#!/usr/bin/env bash
# Regenerates every figure in figure/ with the current code, on whatever machine runs it (about 8 minutes
# on a 2-core CPU): the README's three commands with --figures figure (their checkpoints go to
# outputs/figure-run/, never over yours), then the shipped model's guidance sweep and attention map, the
# shipped adapters' comparisons, sweep and stack, the shipped ControlNets' controls and drawings, the 4-bit
# model beside the full-precision one, the DiT, and the spectra of the full fine-tunes beside AdaLoRA's ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
run=outputs/figure-run
python train.py --out "$run/model.pt" --force --figures figure
python lora_finetune.py --base "$run/model.pt" --out "$run/bold.pt" --force --figures figure
python denoise.py --ckpt "$run/model.pt" --figures figure   # samples, the reverse process, the noise schedule
# Guidance's trade on the shipped model: the same noise at four scales, four digits each.
python denoise.py --ckpt pretrained/model.pt --per-digit 4 --guidance-sweep 1 1.3 2 4 --process '' --figures figure \
  --out outputs/samples_guidance.png
# Where the shipped model's pixels look among the label's tokens, halfway down the chain.
python denoise.py --ckpt pretrained/model.pt --per-digit 1 --attention figure/attention.png --process '' \
  --out outputs/samples_attention.png
python denoise.py --ckpt "$run/model.pt" --lora "$run/bold.pt" --compare --process '' --figures figure
for style in italic inverted; do
  python denoise.py --ckpt pretrained/model.pt --lora "pretrained/$style.pt" --compare --process '' --figures figure
done
python denoise.py --ckpt pretrained/model.pt --lora pretrained/italic.pt --sweep --process '' --figures figure
# Inverted without the stem convolution (the shipped adapter has it): the page turns, the digits dissolve.
python lora_finetune.py --base pretrained/model.pt --style inverted --targets attn,conv --total-steps 2000 \
  --out "$run/inverted-nostem.pt" --force --figures "$run"
python denoise.py --ckpt pretrained/model.pt --lora "$run/inverted-nostem.pt" --compare --process '' --figures "$run"
cp "$run/compare_inverted.png" figure/compare_inverted_nostem.png
python denoise.py --ckpt pretrained/model.pt --lora pretrained/bold.pt pretrained/italic.pt --process '' --figures figure
# ControlNet: controls of test digits, a drawing with every label, and the control with a style adapter.
cn=pretrained/controlnet-skeleton.pt
for control in skeleton sketch; do
  python denoise.py --ckpt pretrained/model.pt --controlnet "pretrained/controlnet-$control.pt" --per-digit 8 --figures figure
done
python denoise.py --ckpt pretrained/model.pt --controlnet $cn --control-from data/drawings/two.png --per-digit 4 \
  --out figure/controlnet_drawing.png
python denoise.py --ckpt pretrained/model.pt --controlnet $cn --lora pretrained/bold.pt --compare --per-digit 5 \
  --figures figure
# QLoRA: the full-precision model | its 4-bit copy | the 4-bit copy with the adapter trained on it.
python denoise.py --ckpt pretrained/model-nf4.pt --lora pretrained/bold-nf4.pt --compare --beside pretrained/model.pt \
  --per-digit 8 --figures figure --out outputs/samples_nf4_bold.png
# The Diffusion Transformer: the UNet | the DiT with LoRA off | on, from the same noise. (figure/dit_designs.png, the
# three label designs and the UNet at equal minutes, is drawn by `python ablate.py dit`, from the runs it scores.)
python denoise.py --ckpt pretrained/dit.pt --lora pretrained/dit-bold.pt --compare --beside pretrained/model.pt \
  --per-digit 8 --figures figure --out outputs/samples_dit_bold.png
# Is a style low-rank? The energy of each full fine-tune's update per layer group, beside where AdaLoRA put its rank.
for style in bold italic; do
  python lora_extract.py --full "pretrained/$style-full.pt" --base pretrained/model.pt \
    --adapters "pretrained/$style-adalora.pt" --spectrum "figure/lowrank_$style.png"
done
