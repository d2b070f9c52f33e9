"""Rank, world size, local rank and rendezvous discovery for every supported launcher.

``torch.distributed`` (and DeepSpeed's ``init_distributed``) rendezvous through five environment
variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Each
launcher provides the process's place in the job differently:

==========================  ==================================================================
launcher                    where the information comes from
==========================  ==================================================================
``torchrun``, ``deepspeed``  the five variables are already set (``launcher = "env"``)
``mpirun -np N`` (OpenMPI)   ``mpi4py``: COMM_WORLD rank/size, node-local rank from a shared-memory
                             split, master address and a free port broadcast from rank 0
``srun`` (Slurm step)        ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; master =
                             first host of ``SLURM_STEP_NODELIST``; port derived from the job id
(nothing)                    a single process: rank 0 of 1
==========================  ==================================================================

:func:`initialize_environment` discovers and exports the five variables before any process group
exists, so that argument validation can already use the world size (and refuse an impossible
layout before any rank waits for another).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, MutableMapping, Optional, Sequence, Tuple

DEFAULT_MASTER_PORT = 29500

__all__ = [
    "DistributedEnv",
    "discover",
    "export",
    "initialize_environment",
    "expand_nodelist",
    "slurm_master_port",
    "FREE_PORT_FLOOR",
    "ephemeral_port_range",
    "find_free_port",
    "configure_cpu_threads",
    "local_rank_from_environ",
    "visible_cuda_device_count",
    "cuda_device_index",
    "bind_cuda_device",
    "is_multi_host",
    "master_address_problem",
    "socket_interface_problem",
    "network_problem",
]


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "env" | "mpi" | "slurm" | "single"
    local_world_size: int = 1  # processes of this job on this host

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or self.launcher != "single"


# --------------------------------------------------------------------------- Slurm node lists


def _expand_range_list(body: str) -> List[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]`` (zero padding kept)."""
    out: List[str] = []
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            lo_i, hi_i = int(lo), int(hi)
            if hi_i < lo_i:
                raise ValueError(f"bad Slurm node range '{part}'")
            out.extend(str(i).zfill(width) for i in range(lo_i, hi_i + 1))
        else:
            out.append(part)
    return out


def _split_top_level(nodelist: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    items, depth, cur = [], 0, []
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in Slurm node list '{nodelist}'")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in Slurm node list '{nodelist}'")
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a Slurm host list the way ``scontrol show hostnames`` does.

    ``"gpu[01-02,05],login1,rack[1-2]-n[3-4]"`` ->
    ``["gpu01", "gpu02", "gpu05", "login1", "rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]``.
    """
    hosts: List[str] = []
    for item in _split_top_level(nodelist):
        # Cartesian product over every bracket group in the item.
        expansions = [""]
        pos = 0
        for m in re.finditer(r"\[([^\]]*)\]", item):
            prefix = item[pos:m.start()]
            choices = _expand_range_list(m.group(1))
            expansions = [e + prefix + c for e in expansions for c in choices]
            pos = m.end()
        tail = item[pos:]
        hosts.extend(e + tail for e in expansions)
    return hosts


def slurm_master_port(environ: MutableMapping[str, str]) -> int:
    """A port all tasks of one Slurm step agree on without communicating.

    Derived from the job and step ids (ports 15000-59999), so that two jobs sharing a node, or two
    steps of one job, do not collide. ``MASTER_PORT`` in the environment wins.
    """
    if environ.get("MASTER_PORT"):
        return int(environ["MASTER_PORT"])
    job = int(environ.get("SLURM_JOB_ID", "0") or 0)
    step = int(environ.get("SLURM_STEP_ID", "0") or 0)
    return 15000 + (job * 7 + step) % 45000


#: the lowest port :func:`find_free_port` hands out (above the well-known and most registered services' ports)
FREE_PORT_FLOOR = 20000


def ephemeral_port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> Tuple[int, int]:
    """The kernel's range of ports for sockets bound to port 0 and outgoing connections (Linux: from
    ``path``; elsewhere, or unreadable, Linux's default 32768-60999)."""
    try:
        with open(path) as f:
            low, high = (int(v) for v in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def find_free_port(ephemeral: Optional[Tuple[int, int]] = None, rng: Optional[random.Random] = None) -> int:
    """A TCP port that is free on this host right now, outside the kernel's ephemeral range.

    The port goes to a process that binds it later (the rendezvous store of rank 0). A port of the
    ephemeral range can be taken meanwhile by any socket the kernel numbers itself -- gloo opens such
    sockets by the dozen per rank -- which once failed a run with EADDRINUSE; a port below the range is
    only ever taken by someone asking for it. Chosen at random in [FREE_PORT_FLOOR, range start), free
    when checked; where that span is too small, the kernel picks one (the old behaviour).
    """
    low = (ephemeral or ephemeral_port_range())[0]
    rng = rng or random.Random()
    if low - FREE_PORT_FLOOR >= 1000:
        for _ in range(100):
            port = rng.randrange(FREE_PORT_FLOOR, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- discovery


def _int_env(environ, name: str) -> Optional[int]:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def _discover_mpi(environ) -> DistributedEnv:
    """Rank, world size, local rank and master through mpi4py (COMM_WORLD)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a dependency
        raise RuntimeError(
            "started under MPI (found " + ", ".join(m for m in _MPI_MARKERS if m in environ)
            + ") but mpi4py is not importable; `pip install mpi4py`") from exc
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    master = None
    if rank == 0:
        if environ.get("MASTER_ADDR"):
            addr = environ["MASTER_ADDR"]
        elif local_size == world:
            addr = "127.0.0.1"  # every rank on this host
        else:
            addr = _this_host_address()
        port = int(environ["MASTER_PORT"]) if environ.get("MASTER_PORT") else find_free_port()
        master = (addr, port)
    addr, port = comm.bcast(master, root=0)
    return DistributedEnv(rank, world, local_rank, addr, port, "mpi", local_size)


def _this_host_address() -> str:
    """An address of this host that other hosts can reach.

    The host name's address, unless that is a loopback address (Debian maps the host name to
    127.0.1.1); then the address of the interface that routes outwards (a UDP "connect" sends no
    packet); loopback as the last resort.
    """
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if not addr.startswith("127."):
        return addr
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return addr


def _discover_slurm(environ) -> DistributedEnv:
    rank = _int_env(environ, "SLURM_PROCID")
    world = _int_env(environ, "SLURM_STEP_NUM_TASKS") or _int_env(environ, "SLURM_NTASKS")
    local_rank = _int_env(environ, "SLURM_LOCALID") or 0
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    if environ.get("MASTER_ADDR"):
        addr = environ["MASTER_ADDR"]
    else:
        hosts = expand_nodelist(nodelist) if nodelist else []
        addr = hosts[0] if hosts else "127.0.0.1"
    local_size = _slurm_tasks_on_this_node(environ)
    return DistributedEnv(rank, world, local_rank, addr, slurm_master_port(environ), "slurm", local_size)


def _slurm_tasks_on_this_node(environ) -> int:
    """Tasks of the step on this node, from ``SLURM_STEP_TASKS_PER_NODE`` (e.g. ``"4(x2),3"``)."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    node = _int_env(environ, "SLURM_NODEID") or 0
    counts: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node] if node < len(counts) else 1


def discover(environ: Optional[MutableMapping[str, str]] = None) -> DistributedEnv:
    """Work out this process's rank etc. from the launcher's environment (no side effects)."""
    environ = os.environ if environ is None else environ
    rank, world = _int_env(environ, "RANK"), _int_env(environ, "WORLD_SIZE")
    if rank is not None and world is not None:
        # torchrun, the deepspeed launcher, or a user who exported the variables.
        local_size = _int_env(environ, "LOCAL_WORLD_SIZE") or _int_env(environ, "LOCAL_SIZE")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world} (env launcher)")
        local_rank = local_rank_from_environ(environ, rank, world, local_size)
        addr = environ.get("MASTER_ADDR") or "127.0.0.1"
        port = _int_env(environ, "MASTER_PORT") or DEFAULT_MASTER_PORT
        # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE
        env = DistributedEnv(rank, world, local_rank, addr, port, "env", local_size or world)
    elif "OMPI_COMM_WORLD_SIZE" in environ or "MV2_COMM_WORLD_SIZE" in environ:
        env = _discover_mpi(environ)  # mpirun (possibly inside a Slurm allocation)
    elif environ.get("SLURM_STEP_ID") is not None and environ.get("SLURM_PROCID") is not None:
        env = _discover_slurm(environ)  # srun step (also with --mpi=pmix)
    elif any(m in environ for m in ("PMI_SIZE", "PMIX_RANK")):
        env = _discover_mpi(environ)  # other MPI launchers
    else:
        # Nobody else has to agree on the port: take a free one unless the user chose it.
        port = _int_env(environ, "MASTER_PORT") or find_free_port()
        env = DistributedEnv(0, 1, 0, environ.get("MASTER_ADDR") or "127.0.0.1", port, "single")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} is outside world size {env.world_size} ({env.launcher} launcher)")
    return env


# Node-local rank variables of the launchers that may start us with RANK/WORLD_SIZE already exported,
# in order of trust: torchrun/deepspeed, OpenMPI, MVAPICH2, MPICH/Intel MPI.
_LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank_from_environ(environ, rank: int, world_size: int, local_world_size: Optional[int] = None) -> int:
    """This process's rank on its node, from the launcher's variables; never guessed from the global rank
    on a multi-node job.

    ``LOCAL_RANK``, then the MPI launchers' node-local ranks, then ``SLURM_LOCALID`` inside an srun
    step. Without any of them the global rank is the local rank only when every rank is on this node
    (world size 1, or a local world size equal to the world size); otherwise ValueError.
    """
    for name in _LOCAL_RANK_VARIABLES:
        value = _int_env(environ, name)
        if value is not None:
            return value
    if environ.get("SLURM_STEP_ID") is not None:
        value = _int_env(environ, "SLURM_LOCALID")
        if value is not None:
            return value
    if world_size == 1 or (local_world_size is not None and local_world_size == world_size):
        return rank
    raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are set but nothing says this process's rank on its "
                     f"node (none of {', '.join(_LOCAL_RANK_VARIABLES)}, SLURM_LOCALID); export LOCAL_RANK")


def visible_cuda_device_count(environ, physical_count: int) -> int:
    """CUDA devices this process can use: ``CUDA_VISIBLE_DEVICES`` when set (an empty value hides all),
    else every device of the node. (torch.cuda.device_count() already applies the variable; this is
    the same rule, for tests and for reasoning about launcher environments.)"""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical_count
    entries = [v for v in visible.split(",") if v.strip()]
    if entries and entries[0].strip() in ("-1", "NoDevFiles"):
        return 0
    return min(len(entries), physical_count)


def cuda_device_index(local_rank: int, visible_count: int) -> Optional[int]:
    """The CUDA device (index among the visible ones) this rank uses; None without CUDA.

    * several visible devices (``deepspeed``, ``torchrun``, ``mpirun``, ``srun`` with the node's GPUs
      visible to every task): the device numbered by the node-local rank;
    * one visible device (``srun --gpus-per-task=1``, or ``CUDA_VISIBLE_DEVICES`` with one entry): device 0,
      whatever the local rank;
    * a local rank with no device of its own: ValueError (more ranks on the node than GPUs).
    """
    if visible_count <= 0:
        return None
    if visible_count == 1:
        return 0
    if not 0 <= local_rank < visible_count:
        raise ValueError(f"node-local rank {local_rank} has no GPU: only {visible_count} are visible to it "
                         f"(start at most one rank per GPU, or check CUDA_VISIBLE_DEVICES)")
    return local_rank


def bind_cuda_device(env: DistributedEnv, visible_count: int,
                     environ: Optional[MutableMapping[str, str]] = None) -> Optional[int]:
    """Choose this rank's CUDA device and make DeepSpeed choose the same one.

    DeepSpeed binds ``cuda:$LOCAL_RANK`` itself (``init_process_group(device_id=...)`` in
    ``init_distributed`` and ``set_device`` in the engine) and, under OpenMPI, asserts that
    ``LOCAL_RANK`` equals ``OMPI_COMM_WORLD_LOCAL_RANK``. So ``LOCAL_RANK`` (and the OpenMPI variable
    when present) is set to the chosen device index. Returns the index, or None without CUDA (nothing
    is changed then). Call before ``deepspeed.init_distributed``.
    """
    environ = os.environ if environ is None else environ
    index = cuda_device_index(env.local_rank, visible_count)
    if index is not None:
        environ["LOCAL_RANK"] = str(index)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in environ:
            environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)
    return index


def export(env: DistributedEnv, environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Write the five rendezvous variables (what ``init_process_group(init_method='env://')`` reads)."""
    environ = os.environ if environ is None else environ
    values = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    }
    environ.update(values)
    return values


def configure_cpu_threads(env: DistributedEnv, environ: Optional[MutableMapping[str, str]] = None) -> int:
    """Share this host's cores among its ranks when nobody chose a thread count.

    torchrun sets ``OMP_NUM_THREADS=1``; ``mpirun``/``srun`` set nothing, and two ranks each using
    every core make a CPU run several times slower. With ``OMP_NUM_THREADS`` unset, it becomes
    (usable cores) // (ranks on this host). Call before importing torch. Returns the value in force.
    """
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return int(environ["OMP_NUM_THREADS"])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, env.local_world_size))
    environ["OMP_NUM_THREADS"] = str(threads)
    return threads


# --------------------------------------------------------------------------- the network between hosts
#
# A multi-host job whose master address is a loopback address (``localhost``, or a host name that
# /etc/hosts maps to 127.0.1.1), or that some host cannot reach, used to hang in the rendezvous until
# --distributed-timeout-minutes. :func:`network_problem` decides before any process group exists; the
# resolver, the probe and the clock are arguments, so that every launcher's environment is tested
# without a network.

MASTER_PROBE_S = 60.0  # how long a rank keeps trying to reach the master host before it gives up


def is_multi_host(env: DistributedEnv, environ: MutableMapping[str, str]) -> bool:
    """Whether the job's ranks span several hosts: fewer ranks on this host than in the job (``LOCAL_WORLD_SIZE``
    of torchrun, ``LOCAL_SIZE`` of the deepspeed launcher, the shared-memory split under MPI, the tasks per
    node of a Slurm step), or the deepspeed launcher's node count ``CROSS_SIZE`` above 1."""
    if env.world_size <= 1:
        return False
    if env.local_world_size < env.world_size:
        return True
    return env.launcher == "env" and (_int_env(environ, "CROSS_SIZE") or 1) > 1


def _resolve(host: str) -> List[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})


def _probe(address: str, port: int, timeout: float) -> Optional[str]:
    """None when ``address`` answers on ``port`` (a connection, or a refusal: the host is there); else why not."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return None
    except socket.timeout:
        return "timed out"
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def master_address_problem(env: DistributedEnv, environ: MutableMapping[str, str], hostname: str,
                           resolve: Callable[[str], Sequence[str]] = _resolve,
                           probe: Callable[[str, int, float], Optional[str]] = _probe,
                           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                           wait_s: float = MASTER_PROBE_S) -> Optional[str]:
    """One line saying why this rank of a multi-host job cannot rendezvous at the master address, or None.

    Refused: a master address that does not resolve on this host, that resolves only to loopback
    addresses (every rank on another host would wait for a process that is not there), or that does not
    answer within ``wait_s`` seconds (a connection or a refusal both prove the host is reachable; an
    unreachable network is final at once). A single-host job is not checked: loopback is right there.
    """
    if not is_multi_host(env, environ):
        return None
    where = f"rank {env.rank} of {env.world_size} on host {hostname}"
    addr, port = env.master_addr, env.master_port
    try:
        addresses = list(resolve(addr))
    except OSError as exc:
        return (f"the master address {addr} does not resolve on {where} ({exc.strerror or exc}); "
                f"give the launcher a master address every host can resolve")
    if not addresses:
        return f"the master address {addr} does not resolve on {where}"
    if all(_is_loopback(a) for a in addresses):
        return (f"the master address {addr} resolves to {', '.join(addresses)} (loopback) on {where}, but the job "
                f"spans several hosts ({env.local_world_size} of its {env.world_size} ranks on this one): the other "
                f"hosts cannot reach it; set the launcher's master address (deepspeed --master_addr, torchrun "
                f"--master-addr, MASTER_ADDR) to an address of the first host that every host can reach")
    target = next(a for a in addresses if not _is_loopback(a))
    deadline = clock() + wait_s
    while True:
        why = probe(target, port, max(0.5, min(5.0, deadline - clock())))
        if why is None:
            return None
        if why == os.strerror(errno.ENETUNREACH) or clock() >= deadline:
            return (f"{where} cannot reach the master address {addr} ({target}) port {port}: {why} "
                    f"(tried for {wait_s:g} s); check the route and firewall between the hosts, or choose the "
                    f"network interface with GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (docs/multinode.md)")
        sleep(min(1.0, max(0.0, deadline - clock())))


def socket_interface_problem(environ: MutableMapping[str, str], interfaces: Sequence[str],
                             hostname: str) -> Optional[str]:
    """One line when ``GLOO_SOCKET_IFNAME`` or ``NCCL_SOCKET_IFNAME`` names no interface of this host, or None.

    Gloo takes exact names (comma-separated, each must exist); NCCL takes name prefixes, ``=name`` for an
    exact name and ``^...`` for exclusions (an exclusion list is not checked).
    """
    gloo = environ.get("GLOO_SOCKET_IFNAME")
    if gloo:
        missing = [n for n in gloo.split(",") if n.strip() and n.strip() not in interfaces]
        if missing:
            return (f"GLOO_SOCKET_IFNAME={gloo} names no interface of host {hostname} ({', '.join(missing)} missing; "
                    f"it has {', '.join(interfaces)})")
    nccl = environ.get("NCCL_SOCKET_IFNAME")
    if nccl and not nccl.startswith("^"):
        items = [n.strip() for n in nccl.split(",") if n.strip()]
        matches = [n for n in items if any(i == n[1:] if n.startswith("=") else i.startswith(n) for i in interfaces)]
        if items and not matches:
            return (f"NCCL_SOCKET_IFNAME={nccl} matches no interface of host {hostname} (it has "
                    f"{', '.join(interfaces)})")
    return None


def network_problem(env: DistributedEnv, environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """:func:`socket_interface_problem` then :func:`master_address_problem` for this host (call before the
    process group forms); None when the job can rendezvous as far as this rank can tell."""
    environ = os.environ if environ is None else environ
    hostname = socket.gethostname()
    try:
        interfaces = [name for _, name in socket.if_nameindex()]
    except OSError:
        interfaces = []
    return (socket_interface_problem(environ, interfaces, hostname) if interfaces else None) or \
        master_address_problem(env, environ, hostname)


def initialize_environment(environ: Optional[MutableMapping[str, str]] = None) -> DistributedEnv:
    """Discover the launcher's environment and export it; returns the :class:`DistributedEnv`."""
    env = discover(environ)
    export(env, environ)
    return env
