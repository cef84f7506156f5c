"""Supermask options measured: Zhou's dynamic weight rescaling, and edge-popup's cosine schedule.

    .venv/bin/python benchmarks/supermask_options.py [--steps 1000]

On mnist5k (LeNet-300-100) and MNIST-1D (its MLP), 2 seeds each, 1,000 score-training steps:
learned supermasks with and without rescaling (mean test accuracy of 10 sampled masks, for the
init and the signed-constant weights), and edge-popup at 50% kept with a constant learning rate
and with the cosine decay ``default_spec`` now uses (Kaiming normal and signed Kaiming constant).
The README's supermask figures come from this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from ticketlab.train.supermask import default_spec, find_supermasks
from ticketlab.zoo.data import load_dataset
from ticketlab.zoo.models import build_model

SETTINGS = (("mnist5k", "lenet_300_100"), ("mnist1d", "mnist1d_mlp"))
SEEDS = (1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="score-training steps")
    args = parser.parse_args()
    started = time.perf_counter()
    for data_name, model in SETTINGS:
        data = load_dataset(data_name)
        template = build_model(model, data.input_shape, data.num_classes, seed=0)
        inits = [
            build_model(model, data.input_shape, data.num_classes, seed=s).state_dict()
            for s in SEEDS
        ]
        learned = default_spec("learned", args.steps)
        for weights in ("init", "signed_constant"):
            for rescale in (False, True):
                found = find_supermasks(
                    template, inits, data, learned, weights=weights, seeds=SEEDS, rescale=rescale
                )
                accs = ", ".join(f"{100 * f.sampled_test_acc:.1f}" for f in found)
                label = "with rescaling" if rescale else "without rescaling"
                print(f"{data_name:8s} learned    {weights:16s} {label:18s} {accs}", flush=True)
        popup = default_spec("edge_popup", args.steps)
        for weights in ("kaiming_normal", "kaiming_constant"):
            for cosine in (False, True):
                spec = dataclasses.replace(popup, cosine=cosine)
                found = find_supermasks(
                    template, inits, data, spec, method="edge_popup", weights=weights, seeds=SEEDS
                )
                accs = ", ".join(f"{100 * f.test_acc:.1f}" for f in found)
                label = "cosine lr" if cosine else "constant lr"
                print(f"{data_name:8s} edge-popup {weights:16s} {label:18s} {accs}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
