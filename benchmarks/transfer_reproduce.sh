#!/usr/bin/env bash
# The transfer experiments recorded in the README ("Do tickets transfer?"), in the order they ran.
# Every command resumes when rerun; runs land in runs/. Usage: bash benchmarks/transfer_reproduce.sh
set -euo pipefail
T=${TICKETLAB:-.venv/bin/ticketlab}
R="--model lenet_300_100 --replicates 2 --steps 1000 --no-controls --no-report"

# MNIST class split with LeNet-300-100: digits 0-4 -> 5-9, oracle = the 5-9 run's own ticket
$T find $R --levels 10 --data mnist5k:0-4 --out runs/split_0-4
$T find $R --levels 10 --data mnist5k:5-9 --out runs/split_5-9
$T transfer runs/split_0-4 --to mnist5k:5-9 --target-run runs/split_5-9 --level 4 --level 10
$T transfer runs/split_0-4 --to mnist5k:5-9 --output-mask redraw --level 10

# optimizer transfer on mnist5k:0-4: an Adam ticket retrained with SGD and vice versa
$T transfer runs/split_0-4 --to mnist5k:0-4 --optimizer sgd --lr 0.05 --level 4 --level 10
$T find $R --levels 4 --fc-rate 0.44 --data mnist5k:0-4 --optimizer sgd --lr 0.05 --out runs/split_0-4_sgd
$T transfer runs/split_0-4_sgd --to mnist5k:0-4 --optimizer adam --lr 0.0012 --level 4

# MNIST-1D follow-ups of the lottery notebook at ~90% sparsity: regenerated data, shuffled
# positions, a new init (6 rounds of 33% reach 9.5% of weights, the notebook's ~91% sparsity)
$T find --model mnist1d_mlp --data mnist1d --levels 6 --fc-rate 0.33 --replicates 2 --no-controls --no-report --out runs/m1d
$T transfer runs/m1d --to mnist1d:seed=1 --level 6
$T transfer runs/m1d --to mnist1d:permute=0 --level 6
$T transfer runs/m1d --to mnist1d --init fresh --level 6
