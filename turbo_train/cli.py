"""`turbo-train RECIPE [--set key=value ...] [--dry-run]`: train from a YAML recipe.

Parses and validates the recipe (with the overrides), prints the resolved recipe, stops there on
--dry-run (nothing is built or written), otherwise writes <run_dir>/resolved_recipe.yaml and builds
and fits the run (`turbo_train.runner.fit`). New knobs belong in the recipe, not in new flags.

    turbo-train recipes/toy/teacher.yaml
    turbo-train recipes/toy/teacher-cpu-smoke.yaml --set trainer.max_steps=2 --set logging.wandb=false
    python -m turbo_train.cli recipes/toy/teacher.yaml --dry-run

`turbo-train synth {teacher,toy-videos} ...` writes latent shards instead (turbo_train/synth.py; a
first argument "synth" is that tool, never a recipe file).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from turbo_train.recipe import load_recipe, save_recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="turbo-train",
        description="Train from a YAML recipe (see recipes/). Every setting lives in the recipe; change one "
                    "for a single run with --set.",
        epilog="example: turbo-train recipes/toy/teacher.yaml --set trainer.max_steps=100 --set optim.lr=1e-4",
    )
    p.add_argument("recipe", help="path of the YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key (dotted, e.g. data.batch_size=16); the value is parsed as YAML; "
                        "repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, then stop (builds nothing)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["synth"]:  # the latent-shard tool, not a recipe
        from turbo_train.synth import main as synth_main

        return synth_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from turbo_train.chain import is_chain_recipe

    if is_chain_recipe(args.recipe):  # the whole pipeline (recipes/toy/turbo.yaml)
        from turbo_train import chain

        try:
            return chain.main(args.recipe, args.overrides, dry_run=args.dry_run)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        run_dir = recipe.resolved_run_dir(args.recipe)
        recipe = dataclasses.replace(recipe, logging=dataclasses.replace(recipe.logging, run_dir=str(run_dir)))
        from turbo_train import runner

        runner.check_supported(recipe)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))  # exits 2 with "turbo-train: error: ..."

    from turbo_train.lightning_compat import is_global_zero

    header = f"turbo-train {args.recipe}" + "".join(f" --set {o}" for o in args.overrides)
    if is_global_zero():
        print(f"# resolved recipe: {header}\n{recipe.to_yaml()}", flush=True)
    if args.dry_run:
        return 0
    if is_global_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "resolved_recipe.yaml", header=f"resolved from: {header}")
    finished = False
    try:
        runner.fit(recipe, run_dir)
        finished = True
    except FileNotFoundError as e:  # e.g. checkpoint.resume or model.checkpoint pointing nowhere
        parser.error(str(e))
    finally:
        close_process_group(wait_for_peers=finished)
    return 0


def close_process_group(wait_for_peers: bool) -> None:
    """Leave a multi-process job in order: after a finished fit every rank waits at a barrier (rank 0
    may still be writing the exported weights) and then destroys the process group. Exiting with the
    group alive let a gloo rank's exit race its peer's teardown: CI saw one worker of a finished
    2-process FSDP2 run die of SIGABRT after the export. After a failure the peers may be gone, so
    there is no barrier then."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait_for_peers:
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
