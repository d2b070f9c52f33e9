"""Which host every rank runs on, so that a failure on a multi-node job can name the host it lost.

:func:`gather` (collective, at start-up, after the process group exists) records every rank's host
name and the IPv4 addresses of that host (its name's address and every interface's: the address a
peer's "connection closed by peer [10.1.2.3]:port" names is one of them). Afterwards, without any
communication:

* :func:`describe_ranks` turns rank numbers into ``"ranks 2, 3 (host node7)"`` (on a multi-host job);
* :func:`ranks_at_address` finds the ranks behind an address quoted in an error text;
* :func:`summary` is the start-up line ``node1: ranks 0-1; node7: ranks 2-3``.

Before :func:`gather` (or in a single process) the functions fall back to plain rank numbers.
"""

from __future__ import annotations

import fcntl
import re
import socket
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["gather", "describe_ranks", "ranks_at_address", "lost_ranks_in_text", "summary", "this_host"]

# rank -> (host name, IPv4 addresses of that host)
_HOSTS: List[Tuple[str, Tuple[str, ...]]] = []

_SIOCGIFADDR = 0x8915


def _interface_addresses() -> List[str]:
    """The IPv4 address of every interface of this host (Linux ioctl; loopback left out)."""
    out = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            addr = socket.inet_ntoa(packed[20:24])
            if not addr.startswith("127."):
                out.append(addr)
    return out


def this_host() -> Tuple[str, Tuple[str, ...]]:
    """(host name, its IPv4 addresses) of this process's host."""
    name = socket.gethostname()
    addrs = []
    try:
        addrs.append(socket.gethostbyname(name))
    except OSError:
        pass
    addrs += _interface_addresses()
    return name, tuple(dict.fromkeys(addrs))


def gather(group=None) -> List[Tuple[str, Tuple[str, ...]]]:
    """Every rank's :func:`this_host`, in rank order (every rank calls this). Kept for later lookups."""
    from megatron_tokenformer.tensor_parallel.mappings import all_gather_objects
    global _HOSTS
    _HOSTS = [(str(h), tuple(a)) for h, a in all_gather_objects(this_host(), group=group)]
    return list(_HOSTS)


def set_hosts(hosts: Sequence[Tuple[str, Sequence[str]]]) -> None:
    """Set the rank -> host table directly (tests; a caller that already knows it)."""
    global _HOSTS
    _HOSTS = [(str(h), tuple(a)) for h, a in hosts]


def _span(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, ranks = [], sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}" if j > i + 1 else
                     f"{ranks[i]}, {ranks[j]}")
        i = j + 1
    return ", ".join(parts)


def describe_ranks(ranks: Iterable[int]) -> str:
    """``"rank 3 (host b)"``, ``"ranks 2, 3 (host b)"``, ``"ranks 1 (host a), 3 (host b)"``; plain numbers
    where the host is unknown or every rank runs on one host."""
    ranks = sorted(set(ranks))
    if not ranks:
        return "another rank"
    word = "rank " if len(ranks) == 1 else "ranks "
    if len({h for h, _ in _HOSTS}) < 2 or any(r >= len(_HOSTS) for r in ranks):
        return word + ", ".join(map(str, ranks))  # one host (or unknown): the host says nothing
    by_host: Dict[str, List[int]] = {}
    for r in ranks:
        by_host.setdefault(_HOSTS[r][0], []).append(r)
    return word + ", ".join(f"{_span(rs)} (host {h})" for h, rs in by_host.items())


def ranks_at_address(addr: str) -> List[int]:
    """The ranks whose host has IPv4 address ``addr`` (empty when none, or before :func:`gather`)."""
    return [r for r, (_, addrs) in enumerate(_HOSTS) if addr in addrs]


_PEER_ADDRESS = re.compile(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]:\d+|(?:from|to|peer) (\d{1,3}(?:\.\d{1,3}){3}):\d+")


def lost_ranks_in_text(text: str, me: Optional[int] = None) -> List[int]:
    """The ranks on the hosts whose addresses ``text`` (an error message) quotes as a peer, this host's
    own ranks excepted (``me``: this rank)."""
    found: List[int] = []
    own = _HOSTS[me][0] if me is not None and me < len(_HOSTS) else None
    for m in _PEER_ADDRESS.finditer(text):
        for r in ranks_at_address(m.group(1) or m.group(2)):
            if r not in found and r != me and _HOSTS[r][0] != own:
                found.append(r)
    return sorted(found)


def summary() -> str:
    """``"a: ranks 0-1; b: ranks 2-3"`` (hosts in order of their first rank); empty before :func:`gather`."""
    by_host: Dict[str, List[int]] = {}
    for r, (h, _) in enumerate(_HOSTS):
        by_host.setdefault(h, []).append(r)
    return "; ".join(f"{h}: rank{'s' if len(rs) > 1 else ''} {_span(rs)}" for h, rs in by_host.items())


def name_lost(silent: Sequence[int], text: str, me: Optional[int] = None) -> str:
    """Who a failed collective lost, for its error line: the ranks a diagnosis found silent, with their
    hosts (``"ranks 2, 3 (host b)"``); else the host whose address the error ``text`` quotes as the
    peer (``"a rank on host b (ranks 2, 3)"``); else ``"another rank"``."""
    if silent:
        return describe_ranks(silent)
    lost = lost_ranks_in_text(text, me)
    if lost:
        hosts = list(dict.fromkeys(_HOSTS[r][0] for r in lost))
        return (f"a rank on host{'s' if len(hosts) > 1 else ''} {', '.join(hosts)} "
                f"({describe_ranks(lost).split(' (')[0]})")
    return "another rank"
