-- Commands: one row per accepted or rejected command, kept for idempotent replays and status queries
-- until expires_at.
CREATE TABLE umw_commands (
    id uuid PRIMARY KEY,
    command text NOT NULL,
    idempotency_key text,
    request_hash bytea NOT NULL,
    state text NOT NULL,
    status smallint NOT NULL,
    response jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX umw_commands_idempotency ON umw_commands (command, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX umw_commands_expiry ON umw_commands (expires_at);

-- The outbox: events committed with their command, relayed in position order.
CREATE TABLE umw_outbox (
    position bigserial PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    command_id uuid,
    topic text NOT NULL,
    key text,
    type text NOT NULL,
    source text NOT NULL,
    subject text,
    data bytea NOT NULL,
    content_type text,
    extensions jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    last_error text,
    published_at timestamptz
);
CREATE INDEX umw_outbox_pending ON umw_outbox (position) WHERE published_at IS NULL;
CREATE INDEX umw_outbox_pending_key ON umw_outbox (key, position) WHERE published_at IS NULL;
CREATE INDEX umw_outbox_published ON umw_outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX umw_outbox_command ON umw_outbox (command_id);

-- Rows that failed for good, from umw_outbox or an application's outbox table.
CREATE TABLE umw_outbox_dead (
    source_table text NOT NULL,
    id text NOT NULL,
    command_id uuid,
    topic text NOT NULL,
    key text,
    type text NOT NULL,
    source text NOT NULL,
    data bytea NOT NULL,
    extensions jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz,
    attempts integer NOT NULL,
    error text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, id)
);
CREATE INDEX umw_outbox_dead_command ON umw_outbox_dead (command_id);

-- Wakes the relays when a transaction that wrote events commits.
CREATE FUNCTION umw_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('umw_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER umw_outbox_notify AFTER INSERT ON umw_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION umw_outbox_notify();
