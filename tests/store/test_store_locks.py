"""The per-monitor lock across Store objects (standing in for daemon instances) on one database."""

from __future__ import annotations

import threading

from tailmon.store.schema import LOCKS


def test_only_one_store_holds_a_monitor(make_store):
    a = make_store("host-a")
    b = make_store("host-b")
    assert a.try_lock("m1") is True
    assert b.try_lock("m1") is False
    assert a.try_lock("m1") is False  # not re-entrant: a second run in this process must wait too
    assert b.try_lock("m2") is True  # locks are per monitor
    holder = b.lock_holder("m1")
    assert (holder["owner_instance"], holder["owner_token"]) == ("host-a", a.token)

    assert a.refresh_lock("m1") is True
    assert b.refresh_lock("m1") is False
    b.release_lock("m1")  # not b's lock: nothing happens
    assert b.try_lock("m1") is False

    a.release_lock("m1")
    assert a.lock_holder("m1") is None
    assert b.try_lock("m1") is True
    assert a.try_lock("m1") is False


def test_stale_lock_is_taken_over(make_store, backdate):
    a = make_store("host-a")
    b = make_store("host-b")
    assert a.try_lock("m1")
    backdate(a, LOCKS, "monitor", "m1", "heartbeat_at", 200)
    assert b.try_lock("m1") is False  # 200 s < stale_after_s = 300 s: a is still alive
    assert a.refresh_lock("m1") is True

    backdate(a, LOCKS, "monitor", "m1", "heartbeat_at", 301)
    assert b.try_lock("m1") is True
    assert b.lock_holder("m1")["owner_instance"] == "host-b"
    # The stalled holder learns it lost the lock, and cannot release the new holder's.
    assert a.refresh_lock("m1") is False
    a.release_lock("m1")
    assert b.lock_holder("m1")["owner_instance"] == "host-b"
    assert a.try_lock("m1") is False


def test_previous_incarnation_lock_is_taken_over_at_once(make_store):
    old = make_store("host-a")
    from test_store_runs import dead_pid

    old.token = f"{dead_pid()}-0123456789abcdef"  # the process is gone (killed -9)
    assert old.try_lock("m1")
    peer = make_store("host-b")
    assert peer.try_lock("m1") is False  # fresh heartbeat, another instance: alive
    new = make_store("host-a")  # host-a restarted after a kill -9
    assert new.try_lock("m1") is True
    assert new.lock_holder("m1")["owner_token"] == new.token
    assert old.refresh_lock("m1") is False


def test_concurrent_takers_get_exactly_one_lock(make_store, backdate):
    """Eight instances race for a free lock, then for a stale one: exactly one wins each time."""
    stores = [make_store(f"host-{i}") for i in range(8)]

    def race():
        barrier = threading.Barrier(len(stores))
        results = [None] * len(stores)
        errors = []

        def take(i):
            try:
                barrier.wait()
                results[i] = stores[i].try_lock("m1")
            except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        return results

    first = race()
    assert first.count(True) == 1
    winner = first.index(True)
    assert stores[0].lock_holder("m1")["owner_token"] == stores[winner].token

    # The winner goes silent past stale_after_s: everyone (the winner included) races again.
    backdate(stores[0], LOCKS, "monitor", "m1", "heartbeat_at", 600)
    second = race()
    assert second.count(True) == 1
    assert stores[0].lock_holder("m1")["owner_token"] == stores[second.index(True)].token

