"""``python -m pipeline.ci [models.yaml]``: print the CI cache key for a manifest's artifacts.

``python -m pipeline.ci plan [models.yaml]`` prints the shard matrix instead (see
:func:`plan_main` and docs/scaling.md).

The artifact cache is content-addressed per conversion, so any old cache dir is
safe to restore; this key only decides when CI saves a new snapshot of it. It
covers everything any conversion's key covers at the manifest level: the
package's format, the installed toolkit, the effective models and the bytes of
every source and calibration file. Printed as ``rknn-<64 hex>``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def manifest_key(manifest_path: str | Path) -> str:
    from pipeline.cache import cache_key, file_sha256
    from pipeline.conversion import dataset_file, sample_files
    from pipeline.manifest import load_manifest
    from pipeline.formats import PIPELINE_FORMAT
    from pipeline.toolkit import installed_version

    manifest = load_manifest(Path(manifest_path))
    models = []
    for model in manifest.models:
        quant = model.get("quantization") or {}
        listing = dataset_file(model)
        inputs = [model["source"], *([listing] if listing else []), *sample_files(model)]
        settings = {k: v for k, v in model.items() if k not in ("source", "index", "quantization")}
        settings["quantization"] = {k: v for k, v in quant.items() if k not in ("dataset", "samples", "images")}
        models.append({"settings": settings, "inputs": [file_sha256(p) for p in inputs]})
    return "rknn-" + cache_key({"pipeline_format": PIPELINE_FORMAT, "toolkit": installed_version(), "models": models})


def plan_main(argv: list[str]) -> int:
    """Ask the shared cache which pairs are missing; print a GitHub Actions matrix of shards as one JSON line.

    ``{"include": [{"shard": "1/3", "pairs": 4, "seconds": 95.0}, ...]}`` for
    ``strategy.matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}``; each shard job
    runs ``doit shard=${{ matrix.shard }}``. Everything cached gives
    ``{"include": []}``, so the workflow starts no shard. The plan is stored in
    the cache, so the shards use exactly this split.
    """
    import argparse
    import json

    from pipeline import shard
    from pipeline.manifest import ManifestError, load_manifest

    parser = argparse.ArgumentParser(prog="python -m pipeline.ci plan")
    parser.add_argument("manifest", nargs="?", default="models.yaml")
    parser.add_argument("--max-shards", type=int, default=shard.MAX_MATRIX,
                        help=f"at most this many shards (default {shard.MAX_MATRIX}, GitHub's matrix limit)")
    parser.add_argument("--shard-seconds", type=float, default=300.0,
                        help="bundle pairs so that each shard has about this much expected work (default 300)")
    parser.add_argument("--shards", type=int, help="exactly this many shards (GitLab's parallel: N)")
    args = parser.parse_args(argv)
    if not 1 <= args.max_shards <= shard.MAX_MATRIX:
        parser.error(f"--max-shards must be between 1 and {shard.MAX_MATRIX}")
    if args.shards is not None and args.shards < 1:
        parser.error("--shards must be at least 1")
    try:
        manifest = load_manifest(Path(args.manifest))
        planner = shard.Planner(manifest, shard.store_for(manifest))
        plan = planner.compute(args.shards, args.max_shards, args.shard_seconds)
        planner.store_plan(plan)
    except (ManifestError, shard.ShardError) as exc:
        print(exc, file=sys.stderr)
        return 1
    include = [{"shard": f"{i}/{plan.shards}", "pairs": len(plan.share(i)), "seconds": plan.load(i)}
               for i in range(1, plan.shards + 1)]
    total = len(planner.keys)
    if include:
        loads = [entry["seconds"] for entry in include]
        balance = max(loads) / (sum(loads) / len(loads)) if sum(loads) else 1.0
        print(f"plan: {total} pair(s), {len(plan.cached)} cached, {len(plan.missing)} to convert on "
              f"{plan.shards} shard(s), ~{sum(loads):.0f} s expected in all, longest shard {balance:.2f}x the mean",
              file=sys.stderr)
    else:
        print(f"plan: all {total} pair(s) are cached; no shard to run", file=sys.stderr)
    print(json.dumps({"include": include}, separators=(",", ":")))
    return 0


def main(argv: list[str]) -> int:
    from pipeline.manifest import ManifestError

    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    try:
        print(manifest_key(argv[0] if argv else "models.yaml"))
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
