"""slurm_env: Slurm hostlists and task variables turned into torch.distributed's environment."""

import pytest

from support import slurm_env
from support.slurm_env import (
    default_master_port,
    expand_hostlist,
    expand_tasks_per_node,
    torch_env_from_slurm,
)


@pytest.mark.parametrize(
    "expr, hosts",
    [
        ("n1", ["n1"]),
        ("n1,n2", ["n1", "n2"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[007]", ["n007"]),
        ("r[1-2]n[5-6]", ["r1n5", "r1n6", "r2n5", "r2n6"]),
        ("x[3,1]", ["x3", "x1"]),  # order as written, like `scontrol show hostnames`
        ("ip-10-0-1-5,queue-dy-p5-[1-2]", ["ip-10-0-1-5", "queue-dy-p5-1", "queue-dy-p5-2"]),
    ],
)
def test_expand_hostlist(expr, hosts):
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize(
    "expr, complaint",
    [
        ("", "empty"),
        ("n[1-2", "never closed"),
        ("n1-2]", r"without '\['"),
        ("n[1-[2]]", "nested"),
        ("n[3-1]", "backwards"),
        ("n[a-b]", "inside brackets"),
        ("n[]", "inside brackets"),
        ("n1,,n2", "empty host name"),
    ],
)
def test_expand_hostlist_rejects_malformed(expr, complaint):
    with pytest.raises(ValueError, match=complaint):
        expand_hostlist(expr)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4") == [4]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8(x2),4(x1)") == [8, 8, 4]
    with pytest.raises(ValueError, match=r"N\(xM\)"):
        expand_tasks_per_node("2(3)")


def _slurm_task(**overrides: str) -> dict[str, str]:
    """Variables srun gives task 3 of `srun --nodes=2 --ntasks-per-node=2` (seen on Slurm 22.05)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "PATH": "/usr/bin",
    }
    env.update(overrides)
    return {key: value for key, value in env.items() if value != ""}


def test_torch_env_from_srun_task():
    assert torch_env_from_slurm(_slurm_task()) == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(15000 + 4242),
    }


def test_local_world_size_from_uneven_tasks_per_node():
    # `srun -n 5 --nodes=2`: 3 tasks on the first node, 2 on the second; only SLURM_NODEID tells
    # which entry is this node's. SLURM_NTASKS_PER_NODE exists only when it was requested.
    first = _slurm_task(SLURM_NTASKS="5", SLURM_NTASKS_PER_NODE="", SLURM_TASKS_PER_NODE="3,2", SLURM_NODEID="0")
    second = dict(first, SLURM_NODEID="1")
    assert torch_env_from_slurm(first)["LOCAL_WORLD_SIZE"] == "3"
    assert torch_env_from_slurm(second)["LOCAL_WORLD_SIZE"] == "2"
    compressed = _slurm_task(SLURM_NTASKS_PER_NODE="", SLURM_TASKS_PER_NODE="2(x3)", SLURM_NODEID="")
    assert torch_env_from_slurm(compressed)["LOCAL_WORLD_SIZE"] == "2"  # all equal: no node id needed
    with pytest.raises(ValueError, match="SLURM_NODEID=4.*only 2 nodes"):
        torch_env_from_slurm(dict(first, SLURM_NODEID="4"))


def test_master_addr_and_port_set_by_the_user_are_kept():
    env = torch_env_from_slurm(_slurm_task(MASTER_ADDR="10.0.0.9", MASTER_PORT="29500"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.9", "29500")


def test_master_addr_prefers_the_step_nodelist():
    # A step on part of the allocation: its rank 0 runs on the step's first node.
    env = torch_env_from_slurm(_slurm_task(SLURM_STEP_NODELIST="gpu[08]", SLURM_NODELIST="gpu[08]"))
    assert env["MASTER_ADDR"] == "gpu08"
    only_job_list = _slurm_task(SLURM_STEP_NODELIST="", SLURM_NODELIST="", SLURM_JOB_NODELIST="a[3-4]")
    assert torch_env_from_slurm(only_job_list)["MASTER_ADDR"] == "a3"
    only_nodelist = _slurm_task(SLURM_STEP_NODELIST="", SLURM_JOB_NODELIST="", SLURM_NODELIST="b9,b1")
    assert torch_env_from_slurm(only_nodelist)["MASTER_ADDR"] == "b9"


def test_default_master_port_is_unprivileged_and_outside_the_ephemeral_range():
    ports = {default_master_port(str(job)) for job in range(0, 100_000, 7)}
    assert min(ports) >= 1024 and max(ports) < 32768  # Linux picks outgoing ports from 32768 up
    assert default_master_port("15001") == 15001 and default_master_port("30000") == 15000
    with pytest.raises(ValueError, match="SLURM_JOB_ID='12_3'"):
        default_master_port("12_3")


@pytest.mark.parametrize(
    "missing", ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_TASKS_PER_NODE"]
)
def test_missing_variable_is_named(missing):
    env = _slurm_task(SLURM_NTASKS_PER_NODE="", **{missing: ""})
    with pytest.raises(KeyError, match=missing):
        torch_env_from_slurm(env)


def test_missing_nodelist_is_named():
    env = _slurm_task(SLURM_STEP_NODELIST="", SLURM_JOB_NODELIST="", SLURM_NODELIST="")
    with pytest.raises(KeyError, match="SLURM_JOB_NODELIST"):
        torch_env_from_slurm(env)


@pytest.mark.parametrize(
    "key, value, complaint",
    [
        ("SLURM_PROCID", "three", "SLURM_PROCID='three'"),
        ("SLURM_NTASKS", "-1", "SLURM_NTASKS='-1'"),
        ("SLURM_JOB_NODELIST", "gpu[1-", "SLURM_JOB_NODELIST: .*never closed"),
        ("SLURM_JOB_ID", "12x", "SLURM_JOB_ID='12x'"),
    ],
)
def test_malformed_variable_is_named(key, value, complaint):
    env = _slurm_task(SLURM_STEP_NODELIST="", **{key: value})
    with pytest.raises(ValueError, match=complaint):
        torch_env_from_slurm(env)


# `getent ahostsv4 NAME` prints each address three times (STREAM, DGRAM, RAW), the first line
# with the canonical name.
DEBIAN_SELF = "127.0.1.1       STREAM gpu-a\n127.0.1.1       DGRAM  \n127.0.1.1       RAW    \n"
DNS = "10.0.7.21       STREAM gpu-a.cluster.local\n10.0.7.21       DGRAM  \n10.0.7.21       RAW    \n"


@pytest.mark.parametrize(
    "getent, expected",
    [
        (DNS, "10.0.7.21"),
        (DEBIAN_SELF + DNS, "10.0.7.21"),  # /etc/hosts' 127.0.1.1 alias first: skipped
        (DEBIAN_SELF, "gpu-a"),  # only loopback: the name, for every node to resolve itself
        ("127.0.0.1       STREAM localhost\n", "gpu-a"),
        ("", "gpu-a"),  # getent found nothing
        ("0.0.0.0 STREAM\nnot an address line\n10.1.2.3 STREAM\n", "10.1.2.3"),
        ("::1 STREAM\nfe80::1 STREAM\n", "gpu-a"),  # IPv6 lines are not IPv4 answers
    ],
    ids=["dns", "debian-alias-then-dns", "debian-alias-only", "localhost", "nothing", "odd-lines", "ipv6"],
)
def test_rendezvous_host_is_the_first_address_other_nodes_can_reach(getent, expected):
    assert slurm_env.rendezvous_host("gpu-a", getent) == expected
