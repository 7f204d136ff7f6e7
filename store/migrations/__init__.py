"""The store's schema history: Alembic revisions, applied by `tailmon.store.migrate`.

Each revision is a file here named after its id, which is its position in the history (0001,
0002, ...). The first three are the schema versions 1..3 of the release before Alembic, with the
same DDL; `tailmon.store.migrate` stamps such a database at the matching revision.

Rules for the next revision:

* append only: never edit a revision that has shipped; add `NNNN_what.py` with `revision` the next
  id and `down_revision` the last one;
* write the tables out as they are at that revision (plain SQLAlchemy types, never the models of
  `tailmon.store.schema`, which follow the head), so that an old revision keeps creating what it
  always created; test_store_schema checks that the head and the models agree;
* the docstring's first line says what the revision does: it is the revision's description in
  errors and in the `schema_version` table that older releases read;
* upgrade only, like the migrations before Alembic: going back means restoring a backup.
"""
