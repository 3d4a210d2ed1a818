-- No foreign keys on the hot tables. Each delivery inserted ran a referential check that
-- share-locked its event's row, and each attempt inserted one on its delivery's row: a
-- query, a row lock and its WAL per row, about a tenth of the database's time per event.
-- The rows they guarded are made together by construction: a delivery in the statement that
-- stores its event (or, replayed, under a share lock of the event's row), an attempt from
-- the update of its delivery in the statement that records it. Retention, the only place
-- events are removed, removes their deliveries and attempts in the same statement.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_event_seq_fkey;
ALTER TABLE attempts DROP CONSTRAINT attempts_delivery_fkey;
