"""The runs part of the Store: model versions, a run's life from `running` to closed, and the
queries over runs, their estimates and samples."""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy import update as update_  # `update` is also a parameter name below
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from tailmon.errors import InputError, RuntimeFailure
from tailmon.redact import mask_secrets, redact
from tailmon.store.base import StoreBase
from tailmon.store.reports import SAMPLE_KEYS, redacted_settings, report_rows, sample_rows
from tailmon.store.schema import ESTIMATES, FINAL_STATUSES, MODEL_VERSIONS, RUN_STATUSES, RUNS, SAMPLES


class RunStore(StoreBase):
    """Runs and model versions; every method runs its own transaction."""

    # -- model versions

    def model_version(self, monitor: str, model_ref: str, fingerprint: str) -> int:
        """The monitor's model version: 1 at first, +1 whenever the fingerprint differs from the last."""
        t = MODEL_VERSIONS
        with self._tx(f"model version of monitor '{monitor}'") as conn:
            conflicts = 0
            while True:
                now = self._now(conn)
                last = conn.execute(select(t.c.id, t.c.version, t.c.fingerprint).where(t.c.monitor == monitor)
                                    .order_by(t.c.version.desc()).limit(1)).first()
                if last is not None and last.fingerprint == fingerprint:
                    conn.execute(update(t).where(t.c.id == last.id).values(last_seen=now, model_ref=model_ref))
                    return last.version
                version = 1 if last is None else last.version + 1
                try:
                    # A peer may register the same change concurrently (PostgreSQL): the unique
                    # (monitor, version) pair makes one of us retry and read the other's row.
                    with conn.begin_nested():
                        conn.execute(insert(t).values(monitor=monitor, version=version, model_ref=model_ref,
                                                      fingerprint=fingerprint, first_seen=now, last_seen=now))
                    return version
                except IntegrityError:
                    conflicts += 1
                    if conflicts == 3:  # not a race after all: report it
                        raise

    # -- runs

    def start_run(self, monitor: str, *, model_ref: str, model_version: int, config_hash: str,
                  settings: dict) -> int:
        """Insert a `running` run owned by this store; returns its id."""
        with self._tx(f"starting a run of monitor '{monitor}'") as conn:
            now = self._now(conn)
            result = conn.execute(insert(RUNS).values(
                monitor=monitor, model_ref=model_ref, model_version=int(model_version), config_hash=config_hash,
                status="running", owner_instance=self.instance_id, owner_token=self.token,
                started_at=now, heartbeat_at=now, settings=redacted_settings(settings)))
            return result.inserted_primary_key[0]

    def heartbeat(self, run_id: int) -> bool:
        """Mark the run alive. False (not an error) when it is no longer running: a heartbeat
        thread may tick just after finish_run, and a takeover surfaces in finish_run anyway."""
        with self._tx(f"heartbeat of run {run_id}") as conn:
            now = self._now(conn)
            result = conn.execute(update(RUNS).where(RUNS.c.id == run_id, RUNS.c.status == "running")
                                  .values(heartbeat_at=now))
            return result.rowcount == 1

    def finish_run(self, run_id: int, status: str, *, report: dict | None = None, error: str | None = None,
                   timings: dict | None = None, samples: list[dict] | None = None) -> None:
        """Close a running run with its results, all in one transaction.

        Refuses (RuntimeFailure) a run that does not exist or is no longer `running`; if
        anything fails, nothing is written and the run stays `running`.
        """
        if status not in FINAL_STATUSES:
            raise InputError(f"a run finishes as one of {', '.join(FINAL_STATUSES)}, not '{status}'")
        if status == "succeeded" and report is None:
            raise InputError(f"run {run_id}: a succeeded run needs its report")
        # Everything is converted (and validated) before the transaction opens.
        columns, estimate_rows = report_rows(run_id, report) if report is not None else ({}, [])
        new_samples = sample_rows(run_id, samples) if samples else []

        with self._tx(f"closing run {run_id}") as conn:
            # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises): a peer's
            # interrupt_stale_runs cannot close the run between this check and our update.
            row = conn.execute(select(RUNS.c.status, RUNS.c.started_at).where(RUNS.c.id == run_id)
                               .with_for_update()).first()
            if row is None:
                raise RuntimeFailure(f"database {self.safe_url}: run {run_id} does not exist")
            if row.status != "running":
                raise RuntimeFailure(f"database {self.safe_url}: run {run_id} is already '{row.status}'; "
                                     f"refusing to close it again as '{status}'")
            now = self._now(conn)
            conn.execute(update(RUNS).where(RUNS.c.id == run_id, RUNS.c.status == "running").values(
                status=status, finished_at=now, heartbeat_at=now,
                duration_s=(now - row.started_at).total_seconds(),
                error=redact(mask_secrets(error)) if error is not None else None, timings=timings, **columns))
            if estimate_rows:
                conn.execute(insert(ESTIMATES), estimate_rows)
            if new_samples:
                conn.execute(insert(SAMPLES), new_samples)

    def record_adaptive_update(self, run_id: int, update: dict) -> None:
        """Keep what an adaptive monitor learnt from a closed run with that run: its report's
        `adaptive.update` (the run's `adaptive` block says which adapter and weights it used;
        `tailmon.proposals.adaptive`). No schema change: the report is the run's JSON column."""
        with self._tx(f"recording the adaptive update of run {run_id}") as conn:
            row = conn.execute(select(RUNS.c.report).where(RUNS.c.id == run_id).with_for_update()).first()
            if row is None or row.report is None:
                raise RuntimeFailure(f"database {self.safe_url}: run {run_id} has no report to add the update to")
            report = dict(row.report)
            report["adaptive"] = {**(report.get("adaptive") or {}), "update": update}
            conn.execute(update_(RUNS).where(RUNS.c.id == run_id).values(report=report))

    def record_pooled(self, run_id: int, pooled: dict) -> None:
        """Keep the series' pooled figures and change detector after a closed run with that run:
        the report's `pooled` (`tailmon.estimation.history`). No schema change, as for
        `record_adaptive_update`: the report is the run's JSON column."""
        with self._tx(f"recording the pooled figures of run {run_id}") as conn:
            row = conn.execute(select(RUNS.c.report).where(RUNS.c.id == run_id).with_for_update()).first()
            if row is None or row.report is None:
                raise RuntimeFailure(f"database {self.safe_url}: run {run_id} has no report to add the pooled "
                                     "figures to")
            conn.execute(update_(RUNS).where(RUNS.c.id == run_id).values(report={**row.report, "pooled": pooled}))

    def interrupt_stale_runs(self) -> list[int]:
        """Mark dead runs `interrupted`; returns their ids.

        Dead means: heartbeat older than stale_after_s (any owner), or owned by a previous
        incarnation of this instance id (same name, another process token). A live peer's runs
        have fresh heartbeats and another instance id, so they are never touched.
        """
        with self._tx("interrupting stale runs") as conn:
            now = self._now(conn)
            running = RUNS.c.status == "running"
            previous = conn.execute(
                update(RUNS).where(running, self._previous_incarnation(conn, RUNS))
                .values(status="interrupted", finished_at=now,
                        error=f"interrupted: instance '{self.instance_id}' was restarted while this run was "
                              "in progress")
                .returning(RUNS.c.id)).scalars().all()
            stale = conn.execute(
                update(RUNS).where(running, RUNS.c.heartbeat_at < now - self.stale_after)
                .values(status="interrupted", finished_at=now,
                        error=f"interrupted: no heartbeat for over {self.stale_after_s:g} s (its daemon died or hung)")
                .returning(RUNS.c.id)).scalars().all()
            return sorted(previous + stale)

    # -- queries

    _LIST_COLUMNS = [c for c in RUNS.c if c.name != "report"]

    def list_runs(self, monitor: str | None = None, status: str | None = None, limit: int = 20) -> list[dict]:
        """Newest first; every run column except the (large) `report`."""
        if status is not None and status not in RUN_STATUSES:
            raise InputError(f"status must be one of {', '.join(RUN_STATUSES)}, got '{status}'")
        if int(limit) < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        query = select(*self._LIST_COLUMNS).order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc()).limit(int(limit))
        if monitor is not None:
            query = query.where(RUNS.c.monitor == monitor)
        if status is not None:
            query = query.where(RUNS.c.status == status)
        with self._read("listing runs") as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    _SERIES_COLUMNS = (RUNS.c.id, RUNS.c.started_at, RUNS.c.model_ref, RUNS.c.model_version, RUNS.c.settings,
                       RUNS.c.p_hat, RUNS.c.n_prompts, RUNS.c.n_samples)

    def series_runs(self, monitor: str, up_to: int | None = None) -> list[dict]:
        """The monitor's succeeded runs, oldest first (up to run id `up_to`, when given): id,
        started_at, model_ref, model_version, settings and the run's p_hat, n_prompts and n_samples,
        without the reports (`run_reports` reads those of the runs a pool needs). What the pooled
        figures and the change detector replay (`tailmon.estimation.history`)."""
        query = select(*self._SERIES_COLUMNS).where(RUNS.c.monitor == monitor, RUNS.c.status == "succeeded",
                                                     RUNS.c.p_hat.is_not(None))
        if up_to is not None:
            query = query.where(RUNS.c.id <= int(up_to))
        with self._read(f"reading the run history of monitor '{monitor}'") as conn:
            rows = conn.execute(query.order_by(RUNS.c.started_at, RUNS.c.id))
            return [dict(r._mapping) for r in rows]

    def run_reports(self, run_ids) -> dict[int, dict]:
        """run id -> its stored report (the runs `series_runs` listed that a pool needs)."""
        ids = sorted({int(i) for i in run_ids})
        if not ids:
            return {}
        out = {}
        with self._read("reading run reports") as conn:
            for start in range(0, len(ids), 500):  # bounded IN lists
                chunk = ids[start:start + 500]
                for row in conn.execute(select(RUNS.c.id, RUNS.c.report).where(RUNS.c.id.in_(chunk))):
                    if row.report is not None:
                        out[row.id] = row.report
        return out

    def get_run(self, run_id: int) -> dict | None:
        """Every run column (with `report`) plus `estimates`, one dict per prompt in order."""
        with self._read(f"reading run {run_id}") as conn:
            return self._full_run(conn, RUNS.c.id == run_id)

    def last_run(self, monitor: str, status: str | None = "succeeded") -> dict | None:
        """The monitor's newest run with `status` (any status if None), as get_run returns it."""
        if status is not None and status not in RUN_STATUSES:
            raise InputError(f"status must be one of {', '.join(RUN_STATUSES)}, got '{status}'")
        with self._read(f"reading the last run of monitor '{monitor}'") as conn:
            query = select(RUNS.c.id).where(RUNS.c.monitor == monitor)
            if status is not None:
                query = query.where(RUNS.c.status == status)
            run_id = conn.execute(query.order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc()).limit(1)).scalar()
            return None if run_id is None else self._full_run(conn, RUNS.c.id == run_id)

    def last_start(self, monitor: str, statuses: tuple[str, ...] = ("running", "succeeded", "failed")):
        """When the monitor's newest run with one of `statuses` started (timezone-aware UTC), or
        None: the anchor the daemon schedules an interval monitor's next run from."""
        bad = [s for s in statuses if s not in RUN_STATUSES]
        if bad or not statuses:
            raise InputError(f"statuses must be among {', '.join(RUN_STATUSES)}, got {', '.join(bad) or 'none'}")
        with self._read(f"reading the last start of monitor '{monitor}'") as conn:
            return conn.execute(select(RUNS.c.started_at).where(RUNS.c.monitor == monitor,
                                                                RUNS.c.status.in_(statuses))
                                .order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc()).limit(1)).scalar()

    def _full_run(self, conn: Connection, where) -> dict | None:
        row = conn.execute(select(RUNS).where(where)).first()
        if row is None:
            return None
        run = dict(row._mapping)
        ests = conn.execute(select(ESTIMATES).where(ESTIMATES.c.run_id == run["id"])
                            .order_by(ESTIMATES.c.prompt_index))
        run["estimates"] = [{k: v for k, v in e._mapping.items() if k not in ("id", "run_id")} for e in ests]
        return run

    def get_samples(self, run_id: int) -> list[dict]:
        """The run's stored samples (prompt_index, response, score, log_weight, component), in order."""
        with self._read(f"reading the samples of run {run_id}") as conn:
            rows = conn.execute(select(*(SAMPLES.c[k] for k in SAMPLE_KEYS)).where(SAMPLES.c.run_id == run_id)
                                .order_by(SAMPLES.c.id))
            return [dict(r._mapping) for r in rows]
