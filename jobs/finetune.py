"""Ray job entrypoint for `finch train`: fine-tune on a running Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/finch"]}' \
        -- python jobs/finetune.py --config jobs/qlora_sft.yaml train.lr=1e-4

Inside a job Ray sets RAY_ADDRESS, so training joins the cluster instead of starting one.
Relative paths in the config resolve against the job's working directory (a copy of `.`):
point output_dir and registry_dir at shared storage on a multi-node cluster.
"""

from __future__ import annotations

import argparse

from finch.config import load_config
from finch.train.run import load_run_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="Run config YAML (see jobs/).")
    parser.add_argument("--resume", help="Continue this run folder from its last checkpoint.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing run folder of the same name.")
    parser.add_argument("overrides", nargs="*", help="Dotted overrides, e.g. train.lr=1e-4.")
    args = parser.parse_args()
    if args.resume:
        config = load_run_config(args.resume, args.overrides)
    elif args.config:
        config = load_config(args.config, args.overrides)
    else:
        parser.error("give --config CONFIG (or --resume RUN_FOLDER)")
    train(config, overwrite=args.overwrite, resume=bool(args.resume))


if __name__ == "__main__":
    main()
