"""Permuted-digits for the replay and distillation family (the regularisation issue's protocol).

10 experiences, each a fixed random permutation of the 64 pixels (the first the identity), all
10 classes every time, one shared 10-way head; stratified 70/30 split; MLP 64-256-256-10, Adam
lr 1e-3 (fresh per experience), batch 32, 5 epochs per experience; seeds 0, 1, 2.
Hyper-parameters are chosen on a stratified 20% validation split of the training data (mean
final accuracy of the three seeds), never on test. The data, model, training loop, selection and
metrics are ``split_digits.py``'s.

    python benchmarks/replay_permuted_digits.py [--quick] [--methods "naive,LwF"] [--dropout 0.5]
"""

from __future__ import annotations

import argparse

import torch
from split_digits import (
    ALPHAS,
    BETAS,
    DER_ALPHAS,
    LWF_GRID,
    MLP,
    REPLAY_GRID,
    Experience,
    Method,
    _split,
    digits,
    evaluate_method,
    markdown,
    write_results,
)

REFERENCE = {
    "naive": 37.7,
    "LwF": 47.8,
    "replay (buffer 100)": 72.4,
    "replay (buffer 500)": 88.0,
    "DER (buffer 100)": 87.5,
}


def permuted_digits(seed: int, validation: bool, count: int = 10) -> list[Experience]:
    """The experiences of ``permuted_digits.py`` for the same seed: the same split and the same
    permutations (drawn as it draws them), so that the two families' tables compare row by row."""
    x_tr, y_tr, x_te, y_te = digits(seed, validation)
    g = torch.Generator().manual_seed(10_000 + seed)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(count - 1)]
    perms = [p.numpy() for p in perms]
    return [Experience(_split(x_tr[:, p], y_tr), _split(x_te[:, p], y_te)) for p in perms]


def methods() -> list[Method]:
    return [
        Method("naive", "naive"),
        Method("LwF", "lwf", {"lwf": {"skip_first_task": True}}, LWF_GRID),
        Method("replay (buffer 100)", "replay", {"replay": {"buffer_size": 100}}, REPLAY_GRID),
        Method("replay (buffer 500)", "replay", {"replay": {"buffer_size": 500}}, REPLAY_GRID),
        Method(
            "DER (buffer 100)",
            "der",
            {"der": {"buffer_size": 100, "beta": 0.0}},
            {"der.alpha": DER_ALPHAS},
        ),
        Method(
            "DER++ (buffer 100)",
            "der",
            {"der": {"buffer_size": 100}},
            {"der.alpha": ALPHAS, "der.beta": BETAS},
        ),
        Method(
            "DER++ (buffer 500)",
            "der",
            {"der": {"buffer_size": 500}},
            {"der.alpha": ALPHAS, "der.beta": BETAS},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 seeds, 1 epoch, no grid: a smoke run"
    )
    parser.add_argument("--methods", default="", help="comma-separated labels to (re)run")
    parser.add_argument("--dropout", type=float, default=0.0, help="MLP dropout (protocol: 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs = ((0, 1), 1) if args.quick else ((0, 1, 2), 5)
    chosen = methods()
    order = [m.label for m in chosen]
    if args.methods:
        chosen = [m for m in chosen if m.label in args.methods.split(",")]
    if args.quick:  # the grid's first point only
        chosen = [Method(m.label, m.spec, m.settings()[0]) for m in chosen]
    print(f"== Permuted-digits (replay and distillation), dropout {args.dropout} ==")

    def factory() -> torch.nn.Module:
        return MLP(classes=10, dropout=args.dropout)

    results = [evaluate_method(m, permuted_digits, factory, epochs, seeds) for m in chosen]
    print(markdown(results, REFERENCE))
    if args.quick:
        return
    protocol = (
        "Permuted-digits: 10 experiences (pixel permutations, the first the identity), shared "
        f"10-way head, stratified 70/30, MLP 64-256-256-10 (dropout {args.dropout}), Adam 1e-3, "
        "batch 32, 5 epochs/experience, seeds 0-2; grid chosen on a 20% validation split"
    )
    suffix = f"_dropout{args.dropout}" if args.dropout else ""
    path, table = write_results(
        f"replay_permuted_digits{suffix}", protocol, results, REFERENCE, order, bool(args.methods)
    )
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
