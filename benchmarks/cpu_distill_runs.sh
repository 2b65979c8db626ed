#!/bin/bash
# The CPU-sized distillation runs behind BENCHMARKS.md ("Distillers" and "Cross-architecture quality").
# Usage: bash benchmarks/cpu_distill_runs.sh STEP [ARG]   (STEP below; each is one process, one thread is enough)
# Outputs go to $W (default benchmarks/work, git-ignored): teachers, expert trajectories, sets and their snapshots.
# Real data: $D (default: the shared CIFAR-10 archive). Budgets are cut for a 2-core CPU and stated in BENCHMARKS.md;
# the full budgets are the CLI defaults (drop --iterations, --batch-real, --outer-loop/--inner-loop, --train-per-class).
set -euo pipefail
W=${W:-$(dirname "$0")/work}
D=${D:-$(dirname "$0")/../../shared/data/cifar10-jpeg.tar.gz}
mkdir -p "$W/sets"
common=(--data "$D" --ipc 10 --seed 0 --no-progress)
# DSA at a CPU budget: 100 image updates (= 10 outer iterations of DC's 10-IPC schedule, with 10 instead of 50 network
# epochs between updates), 64 instead of 256 real images per class, drawn from a 1,000-per-class subset.
dsa=(--method dsa --train-per-class 1000 --batch-real 64 --outer-loop 10 --inner-loop 10 --iterations 100 --snapshot-every 20)
case "$1" in
  teacher_w512)   # feature model for ResNet-18 / VGG-11 students: ConvNet width 512, one epoch on all 50,000 images
    elf train-teacher --data "$D" --model ConvNetW512 --epochs 1 --momentum 0.9 --weight-decay 5e-4 --out "$W/teacher_w512" \
      --test-per-class 100 --no-progress ;;
  dsa_random)     # DSA, fresh random ConvNets (DC/DSA)
    elf distill "${dsa[@]}" "${common[@]}" --out "$W/sets/dsa_random.safetensors" --checkpoint-dir "$W/ck/dsa_random" ;;
  dsa_early)      # the same DSA run from an Acc-DD pool: 3 ConvNets trained 2 epochs on the subset, perturbed per draw
    elf distill "${dsa[@]}" "${common[@]}" --pool early --pool-size 3 --pool-epochs 2 --perturb \
      --out "$W/sets/dsa_early.safetensors" --checkpoint-dir "$W/ck/dsa_early" ;;
  dsa_random_o1|dsa_early_o1)   # Acc-DD's use of a pool: a fresh draw for every image update, no inner loop
    pool=(); [ "$1" = dsa_early_o1 ] && pool=(--pool early --pool-size 3 --pool-epochs 2 --perturb)
    elf distill --method dsa --train-per-class 1000 --batch-real 64 --outer-loop 1 --iterations 200 --snapshot-every 40 \
      "${pool[@]}" "${common[@]}" --out "$W/sets/$1.safetensors" --checkpoint-dir "$W/ck/$1" ;;
  expert)         # one MTT expert trajectory (seed $2): ConvNet, MTT protocol (no momentum), 5 epochs on the subset
    elf train-teacher --data "$D" --model ConvNet --epochs 5 --seed "$2" --train-per-class 1000 \
      --out "$W/experts/s$2" --test-per-class 100 --no-progress ;;
  mtt)            # MTT from the experts: N=10 student steps, M=2 expert epochs, start epochs 0..2, 40 iterations
    elf distill --method mtt --experts "$W/experts" --syn-steps 10 --expert-epochs 2 --max-start-epoch 3 \
      --iterations 40 --snapshot-every 20 --train-per-class 1000 "${common[@]}" --out "$W/sets/mtt.safetensors" \
      --checkpoint-dir "$W/ck/mtt" ;;
  dm_pixels|dm_glad)   # GLaD vs pixels at an equal budget: DM, 100 iterations, 64 real images per class
    param=pixels; [ "$1" = dm_glad ] && param=glad
    extra=(); [ "$param" = glad ] && extra=(--generator trained --generator-epochs 5 --glad-init real)
    elf distill --method dm --param "$param" "${extra[@]}" --iterations 100 --batch-real 64 --train-per-class 1000 \
      "${common[@]}" --out "$W/sets/$1.safetensors" --snapshot-every 50 --checkpoint-dir "$W/ck/$1" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
