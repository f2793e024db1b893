#!/usr/bin/env bash
# Reproduce one configuration into analysis/results/NAME (seed 0) or analysis/results/NAME/seeds/SEED:
# train (resuming from its checkpoint if one is there), compress, report, evaluate.
#   bash analysis/reproduce.sh lenet300-gnj [SEED]  (Table 1: lenet300-{gnj,ghs,lu}, lenet5-{gnj,ghs,lu}; SEED: 0)
#   bash analysis/reproduce.sh lenet300-rhs-30      (the fourth prior against gnj after 30 epochs: lenet300-{gnj,rhs}-30)
#   bash analysis/reproduce.sh lenet5-gnj-fast      (the fast recipes: a pretrained start, --variance-lr-factor, cosine;
#                                                    lenet300-{gnj,lu}-fast, lenet5-{gnj,ghs,lu}-fast; RESULTS.md, time to the rows;
#                                                    lenet5-{gnj,ghs}-ramp: the same start, the KL rising over 30 of 60 epochs;
#                                                    lenet300-gnj-ramp: over 50 of 100)
#   bash analysis/reproduce.sh lenet300-gnj-fast-ft (a fast recipe, then fine-tuned: its run in NAME/source, pruned as
#                                                    the recipe prunes, SVI on over the kept weights into NAME; any *-fast-ft)
#   bash analysis/reproduce.sh lenet300-lu-all-ft   (lenet300-lu-fast-ft on all 60,000 training images, as the paper
#                                                    trains: no validation split, so a fixed cut, lu's log alpha 3 and
#                                                    gnj's official thresholds; lenet300-{gnj,lu}-all, lenet5-lu-all, -ft)
#   bash analysis/reproduce.sh lenet300-gnj-sized-ft (as -all-ft, cut at the paper's kept fraction by one threshold for
#                                                    every layer, --max-weights-kept 10.8; lenet300-ghs-sized-ft: 10.6;
#                                                    lenet5-{gnj,ghs}-sized-ft: the lenet5-*-ramp schedule, 0.9%, 0.6%;
#                                                    lenet300-{gnj,ghs}-long-sized-ft: its cosine over 200 epochs;
#                                                    lenet5-{gnj,ghs}-long-sized-ft: cosine and KL ramp stretched to 200;
#                                                    lenet5-{gnj,ghs}-layers-ft: lenet5-*-sized-ft's run and budget,
#                                                    one threshold per layer, analysis/layer_allocation.py)
#   bash analysis/reproduce.sh resnet20-mnist       (ResNet-20 and the VGG at width 0.25 on MNIST: resnet20-mnist, vgg-mnist;
#                                                    vgg-stability: the VGG at width 0.25, 20 epochs on 10,000 examples)
#   THREADS=2 bash analysis/reproduce.sh NAME [SEED] (the same run at 2 torch threads, pretraining included: a
#                                                    perturbation of the numerics, into the seed's folder/threads2)
# Every hyperparameter is written here; each run's config.json and MODEL.json record them too.
set -euo pipefail

# one function, read whole before it runs, and exit on the same line: editing this file (replace it, e.g. with mv)
# cannot derail a run in flight
main() {
  cd "$(dirname "$0")/.."
  name=${1:?usage: bash analysis/reproduce.sh NAME [SEED]}
  seed=${2:-0}
  threads=${THREADS:-1}  # torch threads of every step; another number sums in another order (RESULTS.md, robustness)
  epochs=200; batch=128; lr=1e-3; warmup=0   # Adam, constant lr, no KL warm-up (official settings)
  eval_every=5   # posterior-mean errors every 5 epochs and at the end: evaluation draws nothing, training is the same
  extra=()       # further training options of a recipe
  pretrain=0     # epochs of plain-PyTorch pretraining for --init-from (analysis/pretrain.py), 0: none
  finetune=()    # fine-tuning after pruning (pyro-bc finetune), empty: none
  val_size=5000  # training images held out for validation (pyro-bc's default)
  recipe=$name   # the results folder's name
  size=          # the cut as a size budget, weights kept % (--max-weights-kept), empty: none
  long=          # 1: the recipe's schedule stretched to the paper's 200 epochs
  layers=        # 1: the size budget spent per layer, thresholds ranked on training images (analysis/layer_allocation.py)
  case "$name" in *-fast-ft|*-all-ft|*-sized-ft|*-layers-ft) name=${name%-ft}; finetune=(--lr 3e-4 --lr-schedule cosine --eval-every 5) ;; esac
  case "$name" in
    lenet300-lu-all|lenet5-lu-all|lenet300-gnj-all) name=${name%-all}-fast; val_size=0 ;;
    lenet300-gnj-sized) name=lenet300-gnj-fast; val_size=0; size=10.8 ;;  # the paper's kept fractions (Table 1)
    lenet300-ghs-sized) name=lenet300-ghs-fast; val_size=0; size=10.6 ;;
    lenet5-gnj-sized) name=lenet5-gnj-ramp; val_size=0; size=0.9 ;;   # LeNet-5 from the ramp recipe's start
    lenet5-ghs-sized) name=lenet5-ghs-ramp; val_size=0; size=0.6 ;;
    lenet5-gnj-layers) name=lenet5-gnj-ramp; val_size=0; size=0.9; layers=1 ;;  # -sized's run, a threshold per layer
    lenet5-ghs-layers) name=lenet5-ghs-ramp; val_size=0; size=0.6; layers=1 ;;
    lenet300-gnj-long-sized) name=lenet300-gnj-fast; val_size=0; size=10.8; long=1 ;;  # 200 epochs, as the paper's
    lenet300-ghs-long-sized) name=lenet300-ghs-fast; val_size=0; size=10.6; long=1 ;;
    lenet5-gnj-long-sized) name=lenet5-gnj-ramp; val_size=0; size=0.9; long=1 ;;  # the ramp over 100 of 200 epochs
    lenet5-ghs-long-sized) name=lenet5-ghs-ramp; val_size=0; size=0.6; long=1 ;;
  esac
  base=${name%-30}; [ "$base" != "$name" ] && epochs=30
  base=${base%-fast}; base=${base%-ramp}
  model=${base%-*}; prior=${base##*-}
  case "$name" in
    lenet300-gnj) compress=(--thresholds -2.8 -3 -5) ;;   # the official code's thresholds (docs/METHOD.md 6)
    lenet5-gnj|lenet300-ghs) compress=(--max-error-increase 0.2) ;;  # no gap in log alpha: budget on validation
    lenet5-ghs) compress=(--thresholds -3 -2.2 -2.6 -2.9) ;;  # gap middles; fc1 swept on validation (NOTES.md)
    lenet300-lu|lenet5-lu) compress=(--thresholds 3 3 3 3) ;;     # Sparse VD's per-weight cut, log alpha 3
    lenet300-gnj-30|lenet300-rhs-30) compress=() ;;  # each prior's default cut (log alpha -3): the same rule for both
    lenet300-gnj-fast|lenet300-ghs-fast|lenet300-lu-fast|lenet5-gnj-fast|lenet5-ghs-fast|lenet5-lu-fast)
      pretrain=8; epochs=30; eval_every=5; extra=(--variance-lr-factor 30 --lr-schedule cosine)
      compress=(--max-error-increase 0.1)  # 0.2 spent on pruning costs 0.2 of error; LeNet-5 keeps half the paper's
      [ "$prior" = lu ] && compress=(--thresholds 3 3 3 3)  # the lu rows' cut: 1.06% validation error, the budget's 1.16%
      [ "$model" = lenet300 ] && { pretrain=10; epochs=80; eval_every=10; }
      [ "$model$prior" = lenet300lu ] && compress=(--thresholds 3 3 3) ;;
    lenet5-gnj-ramp|lenet5-ghs-ramp)  # the fast recipe's start, the KL weight rising over half of 60 epochs (RESULTS.md)
      pretrain=8; epochs=60; eval_every=5; warmup=30; extra=(--variance-lr-factor 30 --lr-schedule cosine)
      compress=(--max-error-increase 0.1) ;;
    lenet300-gnj-ramp)  # the same for LeNet-300-100: its fast start, the KL weight rising over half of 100 epochs
      pretrain=10; epochs=100; eval_every=10; warmup=50; extra=(--variance-lr-factor 30 --lr-schedule cosine)
      compress=(--max-error-increase 0.1) ;;
    resnet20-mnist|vgg-mnist)
      model=${name%-mnist}; prior=gnj; epochs=10; eval_every=1; extra=(--width 0.25)
      compress=(--max-error-increase 0.2) ;;  # after 10 epochs log alpha is a continuum: -3 cut the VGG to 90% error
    vgg-stability)  # default settings otherwise: no NaN in 20 epochs is the point
      model=vgg; prior=gnj; epochs=20; eval_every=1; extra=(--width 0.25 --subset 10000)
      compress=(--max-error-increase 0.2) ;;
    *) echo "reproduce.sh: unknown configuration '$name'" >&2; exit 2 ;;
  esac
  [ "$name" = lenet300-lu ] && compress=(--thresholds 3 3 3)
  [ -n "$long" ] && { warmup=$((warmup * 200 / epochs)); epochs=200; eval_every=20; }  # the KL ramp stretched too
  [ "$val_size$model$prior" = 0lenet300gnj ] && compress=(--thresholds -2.8 -3 -5)  # no validation: the official cut
  [ -n "$size" ] && compress=(--max-weights-kept "$size")
  out=analysis/results/$recipe
  [ "$seed" != 0 ] && out=$out/seeds/$seed
  [ "$threads" != 1 ] && out=$out/threads$threads
  final=$out; [ ${#finetune[@]} != 0 ] && out=$out/source   # the recipe's run; the fine-tuned run is $final
  mkdir -p "$out"
  if [ "$pretrain" != 0 ] && [ ! -f "$out/checkpoint.pt" ]; then
    .venv/bin/python analysis/pretrain.py --model "$model" --epochs $pretrain --seed "$seed" --threads "$threads" \
        --val-size $val_size --out "$out/pretrained.pt"
  fi
  [ "$pretrain" != 0 ] && extra+=(--init-from "$out/pretrained.pt")
  resume=(); [ -f "$out/checkpoint.pt" ] && resume=(--resume)
  .venv/bin/pyro-bc train --model "$model" --prior "$prior" --epochs $epochs --batch-size $batch --lr $lr \
      --warmup-epochs $warmup --eval-every $eval_every --seed "$seed" --threads "$threads" --val-size $val_size \
      "${extra[@]}" --out "$out" "${resume[@]}"
  .venv/bin/pyro-bc compress "$out" --out "$out/MODEL.bcz" "${compress[@]}"
  if [ -n "$layers" ]; then  # the same budget, each layer's threshold moved to the lowest training error within it
    [ -f "$out/layer_allocation.json" ] || .venv/bin/python analysis/layer_allocation.py "$out" --max-weights-kept "$size"
    read -r -a compress < <(.venv/bin/python -c \
      'import json, sys; print("--thresholds", *json.load(open(sys.argv[1]))["ranked"][0]["thresholds"])' \
      "$out/layer_allocation.json")
    .venv/bin/pyro-bc compress "$out" --out "$out/MODEL.bcz" "${compress[@]}"
  fi
  if [ ${#finetune[@]} != 0 ]; then   # the same pruning, then SVI over the kept weights; compressed at its thresholds
    ft_epochs=20; [ "$model" = lenet5 ] && ft_epochs=5
    ft_resume=(); [ -f "$final/checkpoint.pt" ] && ft_resume=(--resume)
    .venv/bin/pyro-bc finetune "$out" --epochs $ft_epochs "${compress[@]}" "${finetune[@]}" --threads "$threads" \
        --out "$final" "${ft_resume[@]}"
    read -r -a source_thresholds < <(.venv/bin/python -c \
      'import json, sys; print(*(layer["threshold"] for layer in json.load(open(sys.argv[1]))["layers"]))' "$out/MODEL.json")
    out=$final
    .venv/bin/pyro-bc compress "$out" --out "$out/MODEL.bcz" --thresholds "${source_thresholds[@]}"
  fi
  .venv/bin/pyro-bc report "$out" --compressed "$out/MODEL.bcz"
  .venv/bin/pyro-bc evaluate "$out/MODEL.bcz"
}

main "$@"; exit $?
