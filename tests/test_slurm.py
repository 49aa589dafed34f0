"""slurm/ scripts against a real Slurm (slurmctld + two slurmd on this host, see slurm_cluster.py).

The jobs run the real multinode.py on the smoke config, on CPU. They are submitted from a
temporary directory that mirrors the project through symlinks, so their runs/, .cache/ and
slurm-<id>.out files stay out of the checkout (job ids restart at 1 with every fresh cluster).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, local_cluster, missing_requirement

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "slurm"
SMOKE = ("--config", "configs/smoke.toml")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 240  # a smoke job takes 20-40 s here; a hang must not outlast the test run

needs_slurm = pytest.mark.skipif(missing_requirement() is not None, reason=f"no local Slurm: {missing_requirement()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    with local_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A submit directory whose entries link to the project's files; outputs land in it."""
    view = tmp_path_factory.mktemp("project")
    for entry in REPO.iterdir():
        if entry.name not in {".git", "runs", ".cache", "data", "outputs"} and not entry.name.startswith("slurm-"):
            (view / entry.name).symlink_to(entry)
    return view


def submit(cluster: SlurmCluster, project: Path, script: str, *args: str, sbatch_args: tuple[str, ...] = ()) -> str:
    """sbatch from the project view (SLURM_SUBMIT_DIR is where sbatch runs); returns the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", *sbatch_args, script, *args],
        cwd=project, env=cluster.env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_for(condition, timeout: float, what: str, cluster: SlurmCluster, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{_read(log)}\n{cluster.logs()}")
        time.sleep(0.5)


def wait_for_job(cluster: SlurmCluster, job_id: str, log: Path, timeout: float = JOB_TIMEOUT_S) -> str:
    """Poll the controller (sbatch --wait polls at 2, 8, 32 s) until the job ends; its final state."""
    state = [""]

    def finished() -> bool:
        state[0] = cluster.job_field(job_id, "JobState")
        return state[0] in FINISHED_STATES

    try:
        wait_for(finished, timeout, f"job {job_id} to finish", cluster, log)
    finally:
        if state[0] not in FINISHED_STATES:
            subprocess.run(["scancel", job_id], env=cluster.env, timeout=30)
    return state[0]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_finished_run(run_dir: Path, total_epochs: int, log_text: str) -> None:
    """Every epoch trained exactly once, and the last one evaluated."""
    records = read_metrics(run_dir)
    train_epochs = [r["epoch"] for r in records if "loss" in r]
    assert train_epochs == list(range(1, total_epochs + 1)), log_text
    final_eval = [r for r in records if "recall@1" in r and r["epoch"] == total_epochs]
    assert final_eval and "mAP@10" in final_eval[0], log_text
    assert (run_dir / "snapshot.pt").is_file()


@pytest.mark.slurm
@needs_slurm
def test_sbatch_run_one_node(cluster, project):
    """`sbatch --wait` returns the job's exit code; outputs go to runs/slurm-<job id>."""
    start = time.monotonic()
    result = subprocess.run(
        ["timeout", str(JOB_TIMEOUT_S), "sbatch", "--wait", "slurm/sbatch_run.sh", "2", "1", *SMOKE],
        cwd=project, env=cluster.env, capture_output=True, text=True,
    )
    submitted = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert submitted, f"sbatch failed: {result.stdout}{result.stderr}"
    job_id = submitted.group(1)
    log_text = _read(project / f"slurm-{job_id}.out")
    assert result.returncode == 0, f"{result.stderr}\n{log_text}\n{cluster.logs()}"
    assert "1 node(s) x 2 process(es)" in log_text
    assert_finished_run(project / "runs" / f"slurm-{job_id}", 2, log_text)
    print(f"one-node sbatch_run.sh: {time.monotonic() - start:.1f} s")


def preempt_and_finish(
    cluster: SlurmCluster, project: Path, script: str, scancel_args: tuple[str, ...],
    total_epochs: int, sbatch_args: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Submit, send USR1 once the first snapshot exists, wait for the requeue and the end.

    Checks what every preempted run must show: one requeue, a mid-epoch stop, a resume at exactly
    that step, every epoch trained once. Returns the job id and its log.
    """
    job_id = submit(cluster, project, script, str(total_epochs), "1", *SMOKE, sbatch_args=sbatch_args)
    log = project / f"slurm-{job_id}.out"
    run_dir = project / "runs" / f"slurm-{job_id}"
    wait_for((run_dir / "snapshot.pt").exists, JOB_TIMEOUT_S, "the first snapshot", cluster, log)
    cluster.run("scancel", "--signal=USR1", *scancel_args, job_id)

    def requeued_or_over() -> bool:
        return cluster.job_field(job_id, "Restarts") != "0" or cluster.job_field(job_id, "JobState") in FINISHED_STATES

    wait_for(requeued_or_over, 120, "the requeue", cluster, log)
    assert cluster.job_field(job_id, "Restarts") == "1", f"the job ended without a requeue\n{_read(log)}"
    state = wait_for_job(cluster, job_id, log)
    log_text = _read(log)
    assert state == "COMPLETED", f"{log_text}\n{cluster.logs()}"
    assert cluster.job_field(job_id, "ExitCode") == "0:0"
    assert f"job {job_id} (restart 1)" in log_text and f"requeueing job {job_id}" in log_text
    stop = re.search(r"stopped by SIG\w+ (?:at epoch (\d+) step (\d+)|after epoch (\d+))", log_text)
    resume = re.search(r"resuming from snapshot \S+ (at epoch \d+ step \d+|after epoch \d+)", log_text)
    assert stop and resume, log_text
    # Both name the same position: the epoch in progress counted from 1 and its step, or the
    # last epoch completed.
    assert stop.group(0).split(" ", 3)[3] == resume.group(1), log_text
    assert_finished_run(run_dir, total_epochs, log_text)
    return job_id, log_text


@pytest.mark.slurm
@needs_slurm
def test_sbatch_run_requeues_on_usr1_and_resumes(cluster, project):
    """USR1 to the batch shell only (what --signal=B:USR1@120 sends before the time limit): the
    shell stops torchrun's workers with SIGTERM, they save mid-epoch, the job requeues itself."""
    start = time.monotonic()
    _, log_text = preempt_and_finish(cluster, project, "slurm/sbatch_run.sh", ("--batch",), total_epochs=6)
    assert "got SIGUSR1" in log_text and "stopped by SIGTERM" in log_text
    print(f"preempted and requeued sbatch_run.sh: {time.monotonic() - start:.1f} s")


@pytest.mark.slurm
@needs_slurm
def test_sbatch_run_two_nodes(cluster, project):
    """--nodes=2: one torchrun agent per node, four ranks, rendezvous on n1."""
    start = time.monotonic()
    job_id = submit(cluster, project, "slurm/sbatch_run.sh", "2", "1", *SMOKE, sbatch_args=("--nodes=2",))
    log = project / f"slurm-{job_id}.out"
    state = wait_for_job(cluster, job_id, log)
    log_text = _read(log)
    assert state == "COMPLETED", f"{log_text}\n{cluster.logs()}"
    assert "2 node(s) x 2 process(es)" in log_text
    assert "global rank 0 of 4" in log_text and "global rank 2 of 4" in log_text  # local rank 0 of each node
    assert cluster.job_field(job_id, "NodeList") == "n[1-2]"
    assert_finished_run(project / "runs" / f"slurm-{job_id}", 2, log_text)
    print(f"two-node sbatch_run.sh: {time.monotonic() - start:.1f} s")


@pytest.mark.slurm
@needs_slurm
def test_srun_run_two_nodes_requeues_on_usr1_and_resumes(cluster, project):
    """srun alone, one task per node: ranks and MASTER_ADDR come from slurm_env; USR1 to the
    job's steps (what --signal=USR1@120 sends) reaches the tasks directly, then the job requeues."""
    start = time.monotonic()
    _, log_text = preempt_and_finish(
        cluster, project, "slurm/srun_run.sh", (), total_epochs=6, sbatch_args=("--nodes=2", "--ntasks-per-node=1")
    )
    assert "2 task(s) on 2 node(s)" in log_text
    assert "global rank 0 of 2" in log_text and "global rank 1 of 2" in log_text
    assert "stopped by SIGUSR1" in log_text
    print(f"two-node srun_run.sh, preempted and requeued: {time.monotonic() - start:.1f} s")


# --------------------------------------------------------------------------------------------
# Static checks: no Slurm needed.

# A relative path ending in .py/.toml/.sh (absolute paths and <placeholders> are not the project's).
PATH_TOKEN = re.compile(r"(?<![\w./<>~$-])((?:[\w-]+/)*[\w-]+\.(?:py|toml|sh))\b")
IMPORT = re.compile(r"\bimport ([\w.]+)")
INSTALLED_MODULES = set(sys.stdlib_module_names) | {"torch", "torchvision", "numpy", "PIL", "tqdm", "pytest"}


def named_project_files(text: str) -> set[str]:
    """Project-relative files a script or guide names: scripts, configs and `python -c` imports."""
    modules = {f"{module.replace('.', '/')}.py" for module in IMPORT.findall(text)
               if module.split(".")[0] not in INSTALLED_MODULES}
    return set(PATH_TOKEN.findall(text)) | modules


def test_every_file_named_under_slurm_exists():
    checked = {}
    for path in sorted(SLURM_DIR.iterdir()):
        if path.is_file():
            for name in named_project_files(path.read_text()):
                checked[name] = path.name
    assert {"multinode.py", "support/slurm_env.py"} <= set(checked), checked  # the scan reads the scripts
    missing = {name: where for name, where in checked.items() if not (REPO / name).exists()}
    assert not missing, f"files named under slurm/ that the project lacks: {missing}"


def test_named_file_scan_sees_what_it_must():
    # The scanner itself: it must catch a missing config or launcher, not only pass.
    text = (
        "sbatch slurm/sbatch_run.sh 5 1 --config configs/nope.toml\n"
        "python3 -c 'import support.slurm_env as s, os'\nsrun python3 x.py\n"
        "source /opt/venv/bin/activate.sh ~/y.py <CONFIG>.toml $HOME/z.py"
    )
    assert named_project_files(text) == {"slurm/sbatch_run.sh", "configs/nope.toml", "support/slurm_env.py", "x.py"}


def test_cluster_template_is_complete():
    yaml = pytest.importorskip("yaml")
    text = (SLURM_DIR / "config.yaml.template").read_text()
    config = yaml.safe_load(text)
    header = text.split("\nRegion:")[0]
    placeholders = set(re.findall(r"<[A-Z_]+>", text.split("\nRegion:", 1)[1]))
    assert placeholders and all(p in header for p in placeholders), "every placeholder is explained on top"
    assert config["Scheduling"]["Scheduler"] == "slurm"
    assert "ParallelCluster 3.8 or later" in header  # CAPACITY_BLOCK (3.8), JobExclusiveAllocation (3.7)
    capacity_types = set()
    for queue in config["Scheduling"]["SlurmQueues"]:
        capacity_types.add(queue["CapacityType"])
        reserved = [r for r in queue["ComputeResources"] if "CapacityReservationTarget" in r]
        # pcluster's validator rejects a capacity reservation inside a placement group it creates.
        assert queue["Networking"]["PlacementGroup"]["Enabled"] is not bool(reserved), queue["Name"]
        for resource in queue["ComputeResources"]:
            assert resource["Efa"]["Enabled"] is True, resource["Name"]
            assert resource["Instances"][0]["InstanceType"] in {"p5.48xlarge", "p4d.24xlarge"}
            if queue["CapacityType"] == "CAPACITY_BLOCK":  # static nodes only, all of the block
                assert resource["MinCount"] == resource["MaxCount"] > 0, resource["Name"]
                assert resource in reserved, resource["Name"]
    assert capacity_types == {"CAPACITY_BLOCK", "ONDEMAND"}
    assert [s["StorageType"] for s in config["SharedStorage"]] == ["FsxLustre"]


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM_DIR.glob("*.sh")))
def test_scripts_parse_and_pass_shellcheck(script):
    path = SLURM_DIR / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# --------------------------------------------------------------------------------------------
# The scripts' command lines, with srun and scontrol replaced by recorders: no Slurm needed, and
# the GPU branches run too.

STUB_SRUN = """#!/bin/bash
echo "srun $* | TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-}" >> "$STUB_LOG"
exit "${STUB_SRUN_EXIT:-0}"
"""
STUB_SCONTROL = """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-a\\ngpu-b\\n'; exit 0; fi
if [[ $1 == show && $2 == node ]]; then
    echo "NodeName=${*: -1} Arch=x86_64 CoresPerSocket=48 Gres=${STUB_GRES:-(null)} NodeAddr=${*: -1} State=ALLOCATED"
    exit 0
fi
echo "scontrol $*" >> "$STUB_LOG"
"""
# getent ahostsv4 NAME: STUB_GETENT's lines, or exit status 2 (not found) when it is empty.
STUB_GETENT = """#!/bin/bash
[[ $1 == ahostsv4 && -n ${STUB_GETENT:-} ]] || exit 2
printf '%s\\n' "$STUB_GETENT"
"""


def run_with_stubs(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[int, list[str]]:
    """Run a slurm/ script as Slurm would (from its own copy, SLURM_SUBMIT_DIR = project root)."""
    code, calls, _ = run_with_stubs_and_stderr(tmp_path, script, *args, **env)
    return code, calls


def run_with_stubs_and_stderr(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in {"srun": STUB_SRUN, "scontrol": STUB_SCONTROL, "getent": STUB_GETENT}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    spool_copy = tmp_path / "slurm_script"
    shutil.copy(SLURM_DIR / script, spool_copy)
    log = tmp_path / "calls.log"
    log.write_text("")
    base = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "STUB_LOG": str(log),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_NTASKS": "16",
    }
    result = subprocess.run(
        ["bash", str(spool_copy), *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )
    return result.returncode, log.read_text().splitlines(), result.stderr


def test_sbatch_run_command_line_on_gpu_nodes(tmp_path):
    code, calls = run_with_stubs(
        tmp_path, "sbatch_run.sh", "5", "1", "--config", "configs/smoke.toml",
        SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="96", STUB_GRES="gpu:h100:8(S:0-1)",
        # As on Debian and Ubuntu, /etc/hosts maps the node's own name to 127.0.1.1 first.
        STUB_GETENT="127.0.1.1       STREAM gpu-a\n127.0.1.1       DGRAM\n10.1.2.3        STREAM\n10.1.2.3 DGRAM",
    )
    assert code == 0
    port = 15000 + 77
    assert calls == [
        "srun --cpus-per-task 96 torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id 77 --rdzv_backend c10d "
        f"--rdzv_endpoint 10.1.2.3:{port} --max-restarts 3 multinode.py 5 1 --config configs/smoke.toml "
        "--out_dir runs/slurm-77 | TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 OMP_NUM_THREADS="
    ]


@pytest.mark.parametrize("getent, endpoint", [
    ("127.0.1.1 STREAM gpu-a\n127.0.1.1 DGRAM", "gpu-a"),  # only the loopback alias: the name itself
    ("", "gpu-a"),  # the name does not resolve here
    ("10.0.7.21 STREAM gpu-a.cluster.local", "10.0.7.21"),
], ids=["loopback-only", "unresolved", "dns"])
def test_sbatch_run_rendezvous_endpoint_is_never_a_loopback_address(tmp_path, getent, endpoint):
    code, calls = run_with_stubs(tmp_path, "sbatch_run.sh", SLURM_GPUS_ON_NODE="8", STUB_GETENT=getent)
    assert code == 0 and f" --rdzv_endpoint {endpoint}:{15000 + 77} " in calls[0]


def test_sbatch_run_stops_when_gpu_nodes_gave_the_job_no_gpus(tmp_path):
    # sbatch without --gpus-per-node on a GPU partition: Slurm knows the GPUs but gives none.
    code, calls, stderr = run_with_stubs_and_stderr(tmp_path, "sbatch_run.sh", "5", "1", STUB_GRES="gpu:8(S:0-1)")
    assert code == 2 and calls == []  # nothing started
    assert stderr.count("\n") == 1 and "job 77 was given no GPUs, but node gpu-a has gpu:8(S:0-1)" in stderr
    assert "--gpus-per-node" in stderr and "CPU_PROCS_PER_NODE" in stderr
    # Asking for CPU processes says the CPU run is meant.
    code, calls = run_with_stubs(tmp_path, "sbatch_run.sh", STUB_GRES="gpu:8(S:0-1)", CPU_PROCS_PER_NODE="4")
    assert code == 0 and "--nproc_per_node 4 " in calls[0]


@pytest.mark.parametrize(
    "env, nproc",
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4"),  # --gres=gpu:4 sites
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "2"),
        ({}, "2"),  # no GPUs: CPU_PROCS_PER_NODE, default 2
        ({"CPU_PROCS_PER_NODE": "3"}, "3"),
    ],
)
def test_sbatch_run_workers_per_node(tmp_path, env, nproc):
    code, calls = run_with_stubs(tmp_path, "sbatch_run.sh", **env)
    assert code == 0 and f"--nproc_per_node {nproc} " in calls[0]
    assert "--cpus-per-task" not in calls[0]  # not asked for, not forwarded


def test_sbatch_run_keeps_the_users_out_dir_and_exit_code(tmp_path):
    code, calls = run_with_stubs(tmp_path, "sbatch_run.sh", "--out_dir=/scratch/r1", STUB_SRUN_EXIT="3")
    assert code == 3  # a failed training step fails the job; no requeue
    assert calls[0].split(" | ")[0].endswith("multinode.py --out_dir=/scratch/r1")
    assert not any(call.startswith("scontrol requeue") for call in calls)


def test_srun_run_command_line_and_requeue_after_usr1(tmp_path):
    code, calls = run_with_stubs(tmp_path, "srun_run.sh", "5", "1", SLURM_CPUS_PER_TASK="12")
    assert code == 0
    assert calls == ["srun --cpus-per-task 12 python3 multinode.py 5 1 --out_dir runs/slurm-77 "
                     "| TORCH_DISABLE_SHARE_RDZV_TCP_STORE= OMP_NUM_THREADS=12"]
    # Tasks that saved their snapshot after SIGUSR1 exit with 128 + 10: the job goes back to the queue.
    code, calls = run_with_stubs(tmp_path, "srun_run.sh", "5", "1", STUB_SRUN_EXIT="138")
    assert calls[-1] == "scontrol requeue 77" and code == 138
    code, calls = run_with_stubs(tmp_path, "srun_run.sh", STUB_SRUN_EXIT="1")
    assert code == 1 and calls[-1].startswith("srun ")  # a crash is not requeued
