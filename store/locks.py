"""The per-monitor locks of the Store: one monitor runs in one place at a time across instances."""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from tailmon.store.base import StoreBase
from tailmon.store.schema import LOCKS


class LockStore(StoreBase):
    """Take, refresh, release and read a monitor's lock; every method runs its own transaction."""

    def try_lock(self, monitor: str) -> bool:
        """Take the monitor's lock if it is free, stale, or held by a previous incarnation of
        this instance. Not re-entrant: False while this store itself holds it."""
        with self._tx(f"locking monitor '{monitor}'") as conn:
            now = self._now(conn)
            mine = dict(owner_instance=self.instance_id, owner_token=self.token, acquired_at=now, heartbeat_at=now)
            # The conditional UPDATE is atomic: on PostgreSQL a concurrent taker blocks on the row
            # and then re-checks the condition against the winner's fresh heartbeat.
            taken = conn.execute(update(LOCKS).where(
                LOCKS.c.monitor == monitor,
                (LOCKS.c.heartbeat_at < now - self.stale_after) | self._previous_incarnation(conn, LOCKS),
            ).values(**mine))
            if taken.rowcount == 1:
                return True
            try:
                # No row, or a live holder: the primary key makes exactly one inserter win.
                with conn.begin_nested():
                    conn.execute(insert(LOCKS).values(monitor=monitor, **mine))
                return True
            except IntegrityError:
                return False

    def refresh_lock(self, monitor: str) -> bool:
        """Renew the lock's heartbeat. False when this store does not hold it (any more): the
        caller has lost the lock to a takeover and should stop working on the monitor."""
        with self._tx(f"refreshing the lock of monitor '{monitor}'") as conn:
            now = self._now(conn)
            result = conn.execute(update(LOCKS).where(LOCKS.c.monitor == monitor, self._owned_by_me(LOCKS))
                                  .values(heartbeat_at=now))
            return result.rowcount == 1

    def release_lock(self, monitor: str) -> None:
        """Release the lock if this store holds it; a lock taken over by a peer stays the peer's."""
        with self._tx(f"releasing the lock of monitor '{monitor}'") as conn:
            conn.execute(delete(LOCKS).where(LOCKS.c.monitor == monitor, self._owned_by_me(LOCKS)))

    def lock_holder(self, monitor: str) -> dict | None:
        """The lock's row (owner_instance, owner_token, acquired_at, heartbeat_at), or None."""
        with self._read(f"reading the lock of monitor '{monitor}'") as conn:
            row = conn.execute(select(LOCKS).where(LOCKS.c.monitor == monitor)).first()
            return dict(row._mapping) if row else None
