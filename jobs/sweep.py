"""Ray job entrypoint for `finch tune`: a hyperparameter sweep on a running Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/finch"]}' \
        -- python jobs/sweep.py --config tune/concierge_lr.yaml

Trials spread over the cluster's nodes; output_dir (the sweep's folder) and the run config's
registry_dir must be shared storage on a multi-node cluster.
"""

from __future__ import annotations

import argparse

from finch.tune.sweep import load_sweep_config, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="Sweep config YAML (see tune/).")
    parser.add_argument("--resume", action="store_true", help="Continue the interrupted sweep of this name.")
    parser.add_argument("overrides", nargs="*", help="Dotted overrides of the sweep config.")
    args = parser.parse_args()
    sweep(load_sweep_config(args.config, args.overrides), resume=args.resume)


if __name__ == "__main__":
    main()
