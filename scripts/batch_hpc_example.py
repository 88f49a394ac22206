"""Example (not run by the project): map a region's scenes on a Slurm or PBS cluster with dask-jobqueue.

Each batch job is one Dask worker with one GPU, advertised as the Dask resource ``GPU=1``; every
scene asks for that resource, so a worker maps one scene at a time on its GPU.  The scheduler runs
here (a login node); the model, the inputs and --out-dir must be on a file system every node sees.

    pip install dask-jobqueue==0.9.0          # not part of `make setup`
    python scripts/batch_hpc_example.py --jobs 8 --out-dir /scratch/me/jambeli_2020 'scenes/*.tif'
    python scripts/batch_hpc_example.py --pbs --jobs 4 --out-dir out catalog.json

Re-running the same command resumes: finished scenes are skipped.  The same cluster can serve the
command line instead: print ``cluster.scheduler_address`` and run
``python -m menet_qgis batch … --scheduler tcp://host:port --resources GPU=1 --device cuda``.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--jobs", type=int, default=4, help="batch jobs = GPU workers")
    ap.add_argument("--queue", default="gpu")
    ap.add_argument("--pbs", action="store_true", help="PBS instead of Slurm")
    ap.add_argument("--venv", default=str(Path(__file__).resolve().parents[1] / ".venv"))
    args = ap.parse_args()

    from dask_jobqueue import PBSCluster, SLURMCluster
    from distributed import Client

    from menet_qgis.batch import BatchOptions, run_batch

    common = dict(queue=args.queue, cores=8, processes=1, memory="48GB", walltime="06:00:00",
                  # one worker per job, one task thread, the GPU as a resource tasks ask for
                  worker_extra_args=["--nthreads", "1", "--resources", "GPU=1"],
                  job_script_prologue=[f"source {args.venv}/bin/activate", "export GDAL_CACHEMAX=256"],
                  local_directory="$TMPDIR")
    if args.pbs:
        cluster = PBSCluster(resource_spec="select=1:ncpus=8:ngpus=1:mem=48gb", **common)
    else:
        cluster = SLURMCluster(job_extra_directives=["--gres=gpu:1"], **common)
    print(cluster.job_script(), file=sys.stderr)
    cluster.scale(jobs=args.jobs)
    with Client(cluster) as client:
        client.wait_for_workers(1, timeout=3600)
        manifest = run_batch(args.inputs, args.out_dir, args.model,  # None: the default model, chosen for cuda
                             BatchOptions(resources={"GPU": 1}, retries=2,
                                          engine_options={"device": "cuda", "threads": 4}),
                             client=client)
    print(manifest.table())
    cluster.close()
    return 1 if manifest.counts().get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
