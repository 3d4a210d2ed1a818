-- Callback hosts are destinations while they have work, and every node asks which ones do
-- at each lease round (`SELECT DISTINCT subscription … LIKE 'callback:%'`). Without an index
-- of their own that walks every scheduled delivery: a btree under a database's default
-- collation cannot serve a LIKE prefix unless that collation is "C". This index holds only
-- the scheduled deliveries of callback hosts, and its predicate is the query's, so the
-- planner uses it whatever the collation.
CREATE INDEX deliveries_callback_destinations ON deliveries (subscription)
    WHERE next_attempt_at IS NOT NULL AND subscription LIKE 'callback:%';
