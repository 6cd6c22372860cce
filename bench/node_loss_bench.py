"""What a worker node lost mid-job costs (issue 34): the same job on a two-node Ray cluster on this
machine (tests/test_cluster.py's `ray start` nodes: an on-demand head, the driver's node, and a
spot node holding the engine by label), with and without killing the spot node once captions
are being written.

Scenarios (one fresh cluster each):
  baseline  no fault.
  replace   the spot node is killed (SIGKILL to its raylet and every process of it) and a
            replacement with the same labels joins at once: the job goes on there.
  fail      the spot node is killed and none joins: the job stops after
            resources.node_lost_wait_s in one line naming the node; a replacement then joins
            and the same command runs again (the rerun's time is part of the cost).

    python bench/node_loss_bench.py --scenario baseline replace fail --json /tmp/node_loss.json

Ray's own health checks are left at their defaults (a dead node is noticed after ~20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]

import pyarrow.parquet as pq  # noqa: E402

from capjob.stages.sources.sample import write_hf_parquet  # noqa: E402
from helpers.references import shape_rows  # noqa: E402
from test_cluster import RayNode, kill_node, wait_for_nodes  # noqa: E402


def ids_in(out: pathlib.Path) -> list[str]:
    return [i for table in ("captions", "quarantine") for f in sorted((out / table).glob("*.parquet"))
            for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def run_scenario(scenario: str, rows: int, partitions: int, wait_s: float, root: pathlib.Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    shapes, references = shape_rows(rows, seed=34)
    (root / "data").mkdir(exist_ok=True)
    write_hf_parquet(shapes, root / "data" / "part-0.parquet", references)
    head = RayNode("head", {"HF_HOME": str(root / "hf-head"), "RAY_NODE_MARKET_TYPE": "on-demand"}, num_cpus=3)

    def spot_node() -> RayNode:
        return RayNode("spot", {"HF_HOME": str(root / "hf-spot"), "RAY_NODE_MARKET_TYPE": "spot"}, head_address=head.address,
                       num_cpus=3)

    nodes = [head]
    result: dict = {"scenario": scenario, "rows": rows}
    try:
        nodes.append(spot_node())
        wait_for_nodes(head.address, 2, nodes)
        out = root / "out"
        cmd = [sys.executable, "-m", "capjob", "experiment=offline", "data.format=parquet", f"data.path={root / 'data'}",
               "data.name=nodeloss", f"sink.path={out}", "caption.max_tokens=24", f"data.partitions={partitions}",
               "engine.batch_size=4", f"resources.node_lost_wait_s={wait_s}",
               "+resources.engine_label_selector={ray.io/market-type: spot}",
               "+resources.cpu_label_selector={ray.io/market-type: on-demand}", f"hydra.run.dir={root / 'run'}"]
        env = {**os.environ, "HF_HOME": str(root / "hf-head"), "RAY_ADDRESS": head.address,
               "PYTHONPATH": str(REPO / "src"), "CAPJOB_RAY_DASHBOARD": "0"}
        started = time.monotonic()
        with open(root / "stdout.txt", "w") as stdout, open(root / "stderr.txt", "w") as stderr:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        while scenario != "baseline" and proc.poll() is None and not list((out / "captions").glob("*.parquet")):
            time.sleep(0.2)
        if scenario != "baseline" and proc.poll() is None:
            kill_node(nodes[1])
            result["killed_at_s"] = round(time.monotonic() - started, 1)
            result["rows_written_at_kill"] = len(ids_in(out))
            if scenario == "replace":
                nodes.append(spot_node())
        proc.wait()
        result["run_s"] = round(time.monotonic() - started, 1)
        result["returncode"] = proc.returncode
        errors = [line for line in (root / "stderr.txt").read_text().splitlines() if line.startswith("capjob: error:")]
        result["error"] = errors[0] if errors else None
        result["rows_after_run"] = len(ids_in(out))
        if proc.returncode != 0:
            nodes.append(spot_node())
            wait_for_nodes(head.address, 2, [head, nodes[-1]])
            rerun_started = time.monotonic()
            rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            result["rerun_s"] = round(time.monotonic() - rerun_started, 1)
            result["rerun_returncode"] = rerun.returncode
        done = ids_in(out)
        result["ids"], result["unique_ids"] = len(done), len(set(done))
        result["total_s"] = round(result["run_s"] + result.get("rerun_s", 0), 1)
        return result
    finally:
        for node in reversed(nodes):
            node.terminate()
        for node in reversed(nodes):
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=("baseline", "replace", "fail"), default=["baseline", "replace", "fail"])
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--partitions", type=int, default=30)
    parser.add_argument("--node-lost-wait-s", type=float, default=15.0, help="resources.node_lost_wait_s of the runs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("CAPJOB_CACHE", os.environ.get("CAPJOB_TEST_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "capjob-cache")))
    results = []
    for scenario in args.scenario:
        result = run_scenario(scenario, args.rows, args.partitions, args.node_lost_wait_s,
                              pathlib.Path(tempfile.mkdtemp(prefix=f"node-loss-{scenario}-")))
        print(json.dumps(result), flush=True)
        results.append(result)
    print("| scenario | run s | rerun s | total s | rows written at the kill | rows once at the end | exit |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['run_s']} | {r.get('rerun_s', '-')} | {r['total_s']} | {r.get('rows_written_at_kill', '-')} "
              f"| {r['unique_ids']} of {r['rows']} ({r['ids']} ids) | {r['returncode']}{' then ' + str(r['rerun_returncode']) if 'rerun_s' in r else ''} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
