"""training/rank_hosts.py: the rank -> host table a failed collective uses to name the host it lost."""

import socket

import pytest

from megatron_tokenformer.training import rank_hosts

TABLE = [("node-a", ("10.9.0.10", "192.168.5.1")), ("node-a", ("10.9.0.10", "192.168.5.1")),
         ("node-b", ("10.9.0.11",)), ("node-b", ("10.9.0.11",)), ("node-c", ("10.9.0.12",))]


@pytest.fixture
def table():
    rank_hosts.set_hosts(TABLE)
    yield
    rank_hosts.set_hosts([])


def test_describe_ranks_names_each_host(table):
    assert rank_hosts.describe_ranks([3]) == "rank 3 (host node-b)"
    assert rank_hosts.describe_ranks([3, 2]) == "ranks 2, 3 (host node-b)"
    assert rank_hosts.describe_ranks([0, 1, 2, 3, 4]) == "ranks 0, 1 (host node-a), 2, 3 (host node-b), 4 (host node-c)"
    assert rank_hosts.describe_ranks([]) == "another rank"
    assert rank_hosts.describe_ranks([7]) == "rank 7"  # outside the table: the number only


def test_one_host_or_no_table_gives_plain_numbers():
    rank_hosts.set_hosts([])
    assert rank_hosts.describe_ranks([1]) == "rank 1"
    rank_hosts.set_hosts([("vm", ("10.0.0.1",))] * 4)
    try:
        assert rank_hosts.describe_ranks([1, 3]) == "ranks 1, 3"  # as before host names existed
        assert rank_hosts.summary() == "vm: ranks 0-3"
    finally:
        rank_hosts.set_hosts([])


def test_peer_address_in_gloo_errors_names_the_host(table):
    reset = ("Read error [10.9.0.11]:58058: Connection reset by peer. This is typically caused by a remote worker "
             "hanging or bugs in the application.")
    closed = "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [192.168.5.1]:4775. GLHF!"
    assert rank_hosts.lost_ranks_in_text(reset, me=0) == [2, 3]
    assert rank_hosts.lost_ranks_in_text(closed, me=4) == [0, 1]
    assert rank_hosts.lost_ranks_in_text(closed, me=1) == []   # its own host: not a lost peer
    assert rank_hosts.lost_ranks_in_text("Timed out waiting 30000ms for recv operation", me=0) == []
    assert rank_hosts.name_lost([], reset, 0) == "a rank on host node-b (ranks 2, 3)"
    assert rank_hosts.name_lost([2, 3], reset, 0) == "ranks 2, 3 (host node-b)"  # the diagnosis is exact
    assert rank_hosts.name_lost([], "no address here", 0) == "another rank"


def test_summary_and_spans(table):
    assert rank_hosts.summary() == "node-a: ranks 0, 1; node-b: ranks 2, 3; node-c: rank 4"
    assert rank_hosts._span([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7, 8"


def test_this_host_and_single_process_gather():
    name, addrs = rank_hosts.this_host()
    assert name == socket.gethostname()
    assert all(socket.inet_aton(a) for a in addrs)  # IPv4 literals
    try:
        assert rank_hosts.gather() == [(name, addrs)]  # no process group: this process only
        assert rank_hosts.summary() == f"{name}: rank 0"
    finally:
        rank_hosts.set_hosts([])
