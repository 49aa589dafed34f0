"""torch.distributed environment from a Slurm step's environment.

`srun python multinode.py` starts one process per task and no torchrun, so nothing sets
RANK / WORLD_SIZE / MASTER_ADDR. Slurm tells each task the same facts under its own names;
`torch_env_from_slurm` translates them; `runtime.apply_slurm_env` (called by multinode.py's
`ddp_setup`) copies the result into `os.environ` before `init_process_group`.

Rank 0 is assumed to run on the first node of the step, which holds for Slurm's default block
distribution (tasks fill node 1 first). With `--distribution=arbitrary`, set MASTER_ADDR yourself.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Mapping

# Ports below 1024 need root; 32768-60999 is Linux's default ephemeral range, where the kernel picks
# ports for outgoing connections (a derived port there could already be taken by one).
MASTER_PORT_BASE = 15000
MASTER_PORT_SPAN = 15000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_TASKS_PER_NODE_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist such as `node[01-04,07],gpu[1-2]-ib` into host names, in order.

    Zero padding is kept (`n[08-10]` gives n08 n09 n10). Several bracket groups in one name expand
    to every combination, the leftmost group varying slowest.
    """
    if not expr.strip():
        raise ValueError("hostlist is empty")
    hosts: list[str] = []
    for name in _split_top_level(expr):
        hosts.extend(_expand_name(name, expr))
    return hosts


def _split_top_level(expr: str) -> list[str]:
    """Split at commas outside brackets: `a[1,2],b` -> [`a[1,2]`, `b`]."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(expr):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {expr!r}: nested '[' at position {i}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {expr!r}: ']' without '[' at position {i}")
        elif char == "," and depth == 0:
            names.append(expr[start:i].strip())
            start = i + 1
    if depth != 0:
        raise ValueError(f"hostlist {expr!r}: '[' is never closed")
    names.append(expr[start:].strip())
    if "" in names:
        raise ValueError(f"hostlist {expr!r}: empty host name between commas")
    return names


def _expand_name(name: str, expr: str) -> list[str]:
    """Expand the first bracket group of one name, then the rest of the name recursively."""
    open_at = name.find("[")
    if open_at < 0:
        return [name]
    close_at = name.index("]", open_at)
    prefix, ranges, rest = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
    suffixes = _expand_name(rest, expr) if rest else [""]
    return [prefix + number + suffix for number in _expand_ranges(ranges, expr) for suffix in suffixes]


def _expand_ranges(ranges: str, expr: str) -> list[str]:
    """`01-03,7` -> ['01', '02', '03', '7']; the width of the lower bound sets the zero padding."""
    numbers: list[str] = []
    for item in ranges.split(","):
        match = _RANGE.match(item.strip())
        if match is None:
            raise ValueError(f"hostlist {expr!r}: expected 'N' or 'N-M' inside brackets, got {item!r}")
        low_text, high_text = match.group(1), match.group(2) or match.group(1)
        low, high = int(low_text), int(high_text)
        if high < low:
            raise ValueError(f"hostlist {expr!r}: range {item!r} runs backwards")
        width = len(low_text)
        numbers.extend(str(n).zfill(width) for n in range(low, high + 1))
    return numbers


def expand_tasks_per_node(expr: str) -> list[int]:
    """Expand Slurm's compressed task counts: `2(x3),1` -> [2, 2, 2, 1] (one entry per node)."""
    counts: list[int] = []
    for item in expr.split(","):
        match = _TASKS_PER_NODE_ITEM.match(item.strip())
        if match is None:
            raise ValueError(f"tasks per node {expr!r}: expected 'N' or 'N(xM)', got {item!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def default_master_port(job_id: str) -> int:
    """A port derived from the job id: every task of a job agrees on it without talking, and
    concurrent jobs sharing a node rarely collide."""
    if not job_id.isdigit():
        raise ValueError(f"SLURM_JOB_ID={job_id!r}: expected a decimal job id")
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


def rendezvous_host(node: str, getent_output: str) -> str:
    """The address other nodes should use to reach `node`, from `getent ahostsv4 node` output.

    The first IPv4 address that is not loopback, in getent's order. `hostname -i` is no help:
    Debian and Ubuntu map a machine's own name to 127.0.1.1 in /etc/hosts, and another node
    cannot reach that. When every answer is loopback (or there is none), the name itself is
    returned: each node then resolves it on its own, and on `node` itself a loopback answer still
    reaches the rendezvous store, which listens on every interface.
    """
    for line in getent_output.splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue  # not an address line
        if address.version == 4 and not address.is_loopback and not address.is_unspecified:
            return str(address)
    return node


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for this task.

    MASTER_ADDR and MASTER_PORT already present in `environ` are kept, so a user can pin them.
    """
    return {
        "RANK": str(_int_var(environ, "SLURM_PROCID")),
        "LOCAL_RANK": str(_int_var(environ, "SLURM_LOCALID")),
        "WORLD_SIZE": str(_int_var(environ, "SLURM_NTASKS")),
        "LOCAL_WORLD_SIZE": str(_local_world_size(environ)),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or _first_host(environ),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(default_master_port(_require(environ, "SLURM_JOB_ID"))),
    }


def _local_world_size(environ: Mapping[str, str]) -> int:
    """Tasks on this node. SLURM_NTASKS_PER_NODE exists only when it was requested; otherwise
    SLURM_TASKS_PER_NODE lists every node's count and SLURM_NODEID picks this node's entry."""
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return _int_var(environ, "SLURM_NTASKS_PER_NODE")
    counts = expand_tasks_per_node(_require(environ, "SLURM_TASKS_PER_NODE"))
    if len(set(counts)) == 1:
        return counts[0]
    node_id = _int_var(environ, "SLURM_NODEID")
    if node_id >= len(counts):
        raise ValueError(
            f"SLURM_NODEID={node_id} but SLURM_TASKS_PER_NODE={environ['SLURM_TASKS_PER_NODE']!r} "
            f"describes only {len(counts)} nodes"
        )
    return counts[node_id]


def _first_host(environ: Mapping[str, str]) -> str:
    # The step's node list first: a step may run on a subset of the job's nodes.
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(key):
            try:
                return expand_hostlist(environ[key])[0]
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from None
    raise KeyError(
        "none of MASTER_ADDR, SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set; "
        "run under srun or set MASTER_ADDR"
    )


def _require(environ: Mapping[str, str], key: str) -> str:
    value = environ.get(key)
    if not value:
        raise KeyError(f"{key} is not set; is this process running under srun?")
    return value


def _int_var(environ: Mapping[str, str], key: str) -> int:
    value = _require(environ, key)
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected a non-negative integer") from None
    if number < 0:
        raise ValueError(f"{key}={value!r}: expected a non-negative integer")
    return number
