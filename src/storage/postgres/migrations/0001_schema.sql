-- dispatchd cluster mode: the schema every node shares. Applied once, under an advisory
-- lock, by whichever node starts first (see migrate.rs). Mirrors the embedded backend's
-- tables (docs/storage-format.md) after the producer features: priority, batches,
-- callbacks; plus what several nodes need: nodes and destination leases.

CREATE TABLE dispatchd_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- The append-only event log. seq is the order events were committed in, cluster-wide.
CREATE TABLE events (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              text        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    source          text,
    data            text        NOT NULL,  -- the producer's JSON text, verbatim
    received_at     bigint      NOT NULL,  -- micros since the epoch
    idempotency_key text,
    receipt         bigint,
    priority        smallint    NOT NULL DEFAULT 1,  -- 0 high, 1 normal, 2 low
    batch           text,
    callback        jsonb                  -- {url, headers, secret}
);
CREATE INDEX events_by_type ON events (event_type, seq);
-- Most events have no key: only those with one are indexed.
CREATE UNIQUE INDEX events_by_idempotency_key ON events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Receipt times grow with seq: a block range index is enough and costs next to nothing.
CREATE INDEX events_by_received ON events USING brin (received_at);

CREATE TABLE batches (
    id         text   PRIMARY KEY,
    created_at bigint NOT NULL,
    seqs       bigint[] NOT NULL
);

-- One event to one destination (a subscription, or a callback host).
CREATE TABLE deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_seq       bigint   NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    event_id        text     NOT NULL,
    event_type      text     NOT NULL,
    subscription    text     NOT NULL,
    status          smallint NOT NULL,  -- DeliveryStatus codes: 0 pending … 5 cancelled
    attempts        integer  NOT NULL DEFAULT 0,
    next_attempt_at bigint,             -- set exactly while pending or retrying
    last_error      text,
    created_at      bigint   NOT NULL,
    updated_at      bigint   NOT NULL,
    origin          smallint NOT NULL,  -- 0 publish, 1 replay, 2 redrive
    priority        smallint NOT NULL DEFAULT 1,
    dead_at         bigint
);
CREATE INDEX deliveries_of_event ON deliveries (event_seq, id);
CREATE INDEX deliveries_by_sub_status ON deliveries (subscription, status, id);
-- No index by event type: every index here is rewritten by each attempt's update (status
-- and due time are indexed, so no update is HOT); a list filtered by type walks the ids.
-- The scheduler's scan of due work, per destination it holds.
CREATE INDEX deliveries_due ON deliveries (subscription, next_attempt_at, id)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_dead ON deliveries (dead_at, id) WHERE dead_at IS NOT NULL;

CREATE TABLE attempts (
    delivery      bigint  NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    n             integer NOT NULL,
    started_at    bigint  NOT NULL,
    duration_us   bigint  NOT NULL,
    status_code   integer,
    error         text,
    response_body text    NOT NULL,
    PRIMARY KEY (delivery, n)
);

CREATE TABLE receipts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source           text   NOT NULL,
    method           text   NOT NULL,
    headers          jsonb  NOT NULL,
    body             bytea  NOT NULL,
    received_at      bigint NOT NULL,
    scheme           text   NOT NULL,
    signed_timestamp bigint,
    delivery_id      text,
    event_id         text   NOT NULL,
    event_seq        bigint NOT NULL
);
-- Inbound de-duplication: a provider delivery id, or a body fingerprint, per source.
CREATE TABLE receipt_ids (
    source  text   NOT NULL,
    key     text   NOT NULL,
    receipt bigint NOT NULL REFERENCES receipts (id) ON DELETE CASCADE,
    PRIMARY KEY (source, key)
);

-- Subscriptions created over the API (the config file's live in each node's file): the
-- record as the embedded backend keeps it (definition, secrets with expiry, times).
CREATE TABLE subscriptions (
    id     text  PRIMARY KEY,
    record jsonb NOT NULL
);
-- Run-time switches (pause, 410 Gone, auto-disable) and auto-disable's clock. A row may
-- hold only the clock (enabled NULL): a subscription failing with no switch set.
CREATE TABLE subscription_state (
    id            text    PRIMARY KEY,
    enabled       boolean,
    reason        text,
    changed_at    bigint,
    failing_since bigint
);

-- Cluster membership and destination ownership.
CREATE TABLE nodes (
    id         text   PRIMARY KEY,
    started_at bigint NOT NULL,
    seen_at    bigint NOT NULL  -- heartbeat
);
CREATE TABLE destination_leases (
    destination text   PRIMARY KEY,
    owner       text   NOT NULL,
    epoch       bigint NOT NULL,  -- fencing: outcomes are recorded only under the current epoch
    expires_at  bigint NOT NULL
);
