"""Train the attribute classifier shipped as ldm_deploy/assets/quality/attribute_classifier.pt.

    .venv/bin/python scripts/train_quality_classifier.py            # defaults = the shipped weights
    .venv/bin/python scripts/train_quality_classifier.py --out /tmp/clf.pt --steps 600

Seeded and single-threaded (about 2 minutes on one CPU core); prints the per-attribute
accuracy on fresh generator images (validation seeds disjoint from the training seeds and
from the evaluation prompts) and stores it in the checkpoint's metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm_deploy.quality.classifier import (  # noqa: E402
    DEFAULT_WEIGHTS,
    VAL_SEED_BASE,
    measure_accuracy,
    train_classifier,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--n", type=int, default=24_000, help="training images (rendered once)")
    p.add_argument("--steps", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-n", type=int, default=4_000)
    p.add_argument("--min-accuracy", type=float, default=0.98, help="fail (exit 1) below this per-attribute accuracy")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    clf = train_classifier(n=args.n, seed=args.seed, steps=args.steps, threads=args.threads)
    train_s = time.perf_counter() - t0
    acc = measure_accuracy(clf, n=args.val_n, seed=VAL_SEED_BASE + args.seed)
    clf.meta.update({"val_n": args.val_n, "val_accuracy": {k: round(v, 5) for k, v in acc.items()}})
    path = clf.save(args.out)
    print(f"trained in {train_s:.1f}s; accuracy on {args.val_n} fresh images: "
          + ", ".join(f"{k}={v:.4f}" for k, v in acc.items()))
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")
    worst = min(v for k, v in acc.items() if k != "all")
    if worst < args.min_accuracy:
        print(f"FAIL: per-attribute accuracy {worst:.4f} < {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
