-- relay: the generic capture engine (DESIGN.md, "Database side").
--
-- Installable into any existing database: every statement is idempotent, so
-- running this file twice (by psql, then by `pgrelay migrate`) is harmless.
--
-- The event log is the source of truth; NOTIFY is only a doorbell. A tracked
-- table gets statement-level triggers (relay.enable) that, inside the
-- writing transaction:
--   1. bump the per-scope counter (its row lock orders commits per scope, and
--      a rollback gives the numbers back: G2),
--   2. append one event-log row per changed row, with the row as jsonb (G1),
--   3. send one small notice per event on the channel, without row data, so
--      the 8000-byte NOTIFY limit never applies to the data (G5).

CREATE SCHEMA IF NOT EXISTS relay;

COMMENT ON SCHEMA relay IS
    'pgrelay capture engine: event log, per-scope counters, capture triggers';

-- One row per scope: the last seq handed out. Updated by the capture trigger
-- inside the writing transaction, so concurrent writers of one scope queue on
-- this row's lock and commit in seq order.
--
-- Neither this table nor relay.events has CHECK constraints: Postgres
-- re-reads a CHECK from its stored text on every statement that writes the
-- table, which cost about 14% of a captured insert (callgrind, see the
-- README's Benchmarks). relay.append and relay.capture, the only writers,
-- validate what they write instead.
CREATE TABLE IF NOT EXISTS relay.scope_counter (
    scope    text   PRIMARY KEY,
    last_seq bigint NOT NULL
);
ALTER TABLE relay.scope_counter DROP CONSTRAINT IF EXISTS scope_counter_last_seq_check;
-- Every captured write updates one hot row here. A low fill factor makes
-- Postgres prune the row's dead versions while the page is still mostly
-- empty, so the chain of versions each UPDATE walks stays short (about 6%
-- of a captured insert with the default of 100).
ALTER TABLE relay.scope_counter SET (fillfactor = 10);

-- The event log. (scope, seq) is dense per scope: 1, 2, 3, ... with no gaps
-- until relay.trim removes a prefix.
CREATE TABLE IF NOT EXISTS relay.events (
    scope      text        NOT NULL,
    seq        bigint      NOT NULL,
    resource   text        NOT NULL,
    action     text        NOT NULL,
    row_id     text,
    data       jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (scope, seq)
);
ALTER TABLE relay.events DROP CONSTRAINT IF EXISTS events_action_check;

-- Per scope, the highest seq that relay.trim has deleted. A client resuming
-- from below it gets a `reset` frame instead of a silent gap (G3).
CREATE TABLE IF NOT EXISTS relay.trim_horizon (
    scope           text   PRIMARY KEY,
    trimmed_through bigint NOT NULL
);

-- The notice channel. Overridable per database or role without editing this
-- file: ALTER DATABASE mydb SET relay.channel = 'my_channel';
CREATE OR REPLACE FUNCTION relay.channel() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('relay.channel', true), ''), 'cache_invalidate')
$$;

-- Timestamps on the wire: RFC 3339, UTC, microseconds.
-- STABLE, like to_char itself: a SQL function declared more strictly than
-- its body is never inlined, and then every rendered event paid a full
-- SQL-function call (a quarter of a captured insert's cost).
CREATE OR REPLACE FUNCTION relay.wire_time(t timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- The one renderer of an event. With with_data = false it is the NOTIFY
-- payload; with true it is the client frame. Live delivery, resume and gap
-- fill all read frames through this function, so they send the same bytes.
-- Built by concatenation rather than json_build_object: compact, keys in
-- protocol order, and cheaper. Every text value goes through to_json, which
-- escapes it.
-- Cost: one pass over the row data (jsonb to text). A notice is at most
-- about 1.5 KiB: resource <= 64, scope <= 256 and id <= 1024 bytes.
CREATE OR REPLACE FUNCTION relay.render(e relay.events, with_data boolean DEFAULT true)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT '{"type":"cache_invalidate","resource":' || to_json(e.resource)::text
        || ',"action":' || to_json(e.action)::text
        -- A key longer than 1 KiB is left out of the notice (not the
        -- frame), so the notice stays far below NOTIFY's 8000-byte limit
        -- whatever the key.
        || ',"id":' || CASE WHEN with_data OR octet_length(e.row_id) <= 1024
                            THEN coalesce(to_json(e.row_id)::text, 'null') ELSE 'null' END
        || ',"project_id":' || to_json(e.scope)::text
        || ',"seq":' || e.seq::text
        || ',"timestamp":"' || relay.wire_time(e.created_at) || '"'
        || CASE WHEN with_data THEN ',"data":' || e.data::text ELSE '' END
        || '}'
$$;

-- Appends one event per row image, in array order, and rings the doorbell
-- for each. The capture trigger calls it; apps may call it too, to publish
-- an event that is not a row change, with the same seq and delivery rules.
--
-- Guarantees: each row image gets exactly one event in the scope named by
-- its p_scope_col field; seqs are contiguous per scope, in commit order,
-- because the counter row stays locked until the caller's transaction ends.
-- A missing or oversized scope aborts the write: a change that cannot be
-- captured must not be committed (G1).
-- Cost: one counter upsert per scope touched, one batched insert, one small
-- NOTIFY per event. relay.capture inlines the single-row case.
CREATE OR REPLACE FUNCTION relay.append(
    p_resource  text,
    p_action    text,
    p_scope_col text,
    p_id_col    text,
    p_rows      jsonb[]
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_bad   jsonb;
    v_count bigint;
BEGIN
    IF p_action IS DISTINCT FROM 'INSERT' AND p_action IS DISTINCT FROM 'UPDATE'
       AND p_action IS DISTINCT FROM 'DELETE' THEN
        RAISE EXCEPTION 'relay: unknown action % for resource "%"', coalesce(p_action, 'NULL'), p_resource
            USING ERRCODE = 'check_violation',
                  HINT = 'An event''s action is INSERT, UPDATE or DELETE.';
    END IF;
    SELECT d INTO v_bad
    FROM unnest(p_rows) AS u(d)
    WHERE d ->> p_scope_col IS NULL OR length(d ->> p_scope_col) > 256
    LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'relay: cannot capture % of resource "%": scope column "%" is %',
            p_action, p_resource, p_scope_col,
            CASE WHEN v_bad ->> p_scope_col IS NULL THEN 'NULL or missing'
                 ELSE 'longer than 256 characters' END
            USING ERRCODE = 'not_null_violation',
                  HINT = 'Every captured row needs a scope (project) of at most 256 characters.';
    END IF;

    WITH img AS (
        SELECT d, d ->> p_scope_col AS scope, d ->> p_id_col AS row_id,
               row_number() OVER (PARTITION BY d ->> p_scope_col ORDER BY ord) AS rn
        FROM unnest(p_rows) WITH ORDINALITY AS u(d, ord)
    ), counts AS (
        SELECT scope, count(*) AS n FROM img GROUP BY scope
    ), bumped AS (
        -- ORDER BY scope: statements touching several scopes lock their
        -- counters in one global order, so they cannot deadlock each other.
        INSERT INTO relay.scope_counter AS c (scope, last_seq)
        SELECT scope, n FROM counts ORDER BY scope
        ON CONFLICT (scope) DO UPDATE SET last_seq = c.last_seq + excluded.last_seq
        RETURNING c.scope, c.last_seq
    ), appended AS (
        INSERT INTO relay.events AS e (scope, seq, resource, action, row_id, data)
        SELECT img.scope, b.last_seq - counts.n + img.rn, p_resource, p_action, img.row_id, img.d
        FROM img JOIN counts USING (scope) JOIN bumped b USING (scope)
        RETURNING e
    )
    SELECT count(pg_notify(relay.channel(), relay.render(x.e, false)))
    INTO v_count
    FROM (SELECT a.e FROM appended a ORDER BY (a.e).scope, (a.e).seq) x;
    RETURN v_count;
END
$$;

-- The capture trigger, attached per table by relay.enable as three
-- statement-level triggers with transition tables: a 10,000-row statement
-- costs one counter update and one batched insert, not 10,000 of each.
-- TG_ARGV: resource, scope column, id column.
CREATE OR REPLACE FUNCTION relay.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_rows   jsonb[];
    v_moved  jsonb[];
    v_keys   jsonb;
    v_one    jsonb;
    v_scope  text;
    v_seq    bigint;
    v_notice text;
    v_void   text;
BEGIN
    -- DELETE events carry the row as it was; INSERT and UPDATE the row as
    -- it is after the change.
    IF TG_OP = 'DELETE' THEN
        SELECT array_agg(to_jsonb(o)) INTO v_rows FROM relay_old_rows o;
    ELSE
        SELECT array_agg(to_jsonb(n)) INTO v_rows FROM relay_new_rows n;
    END IF;
    IF cardinality(v_rows) = 1 THEN
        -- One row, the common case: relay.append's three steps without its
        -- set machinery or the call itself, about a tenth of the cost of
        -- a captured single-row insert.
        v_one := v_rows[1];
        v_scope := v_one ->> TG_ARGV[1];
        IF v_scope IS NULL OR length(v_scope) > 256 THEN
            -- relay.append owns the error message; it raises here.
            PERFORM relay.append(TG_ARGV[0], TG_OP, TG_ARGV[1], TG_ARGV[2], v_rows);
        END IF;
        INSERT INTO relay.scope_counter AS c (scope, last_seq) VALUES (v_scope, 1)
        ON CONFLICT (scope) DO UPDATE SET last_seq = c.last_seq + 1
        RETURNING c.last_seq INTO v_seq;
        INSERT INTO relay.events AS e (scope, seq, resource, action, row_id, data)
        VALUES (v_scope, v_seq, TG_ARGV[0], TG_OP, v_one ->> TG_ARGV[2], v_one)
        RETURNING relay.render(e, false) INTO v_notice;
        -- An assignment, not PERFORM: a plain expression skips the executor.
        v_void := pg_notify(relay.channel(), v_notice)::text;
    ELSIF v_rows IS NOT NULL THEN
        PERFORM relay.append(TG_ARGV[0], TG_OP, TG_ARGV[1], TG_ARGV[2], v_rows);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        -- A row moved to another scope has left its old one: that scope
        -- gets a DELETE with the row as it was, so its subscribers drop it
        -- (and a moved membership is re-checked there: G4).
        IF cardinality(v_rows) = 1 THEN
            SELECT ARRAY[to_jsonb(o)] INTO v_moved FROM relay_old_rows o
            WHERE to_jsonb(o) ->> TG_ARGV[1] IS DISTINCT FROM v_rows[1] ->> TG_ARGV[1]
               OR to_jsonb(o) ->> TG_ARGV[2] IS DISTINCT FROM v_rows[1] ->> TG_ARGV[2];
        ELSE
            -- Keys of the new images as a jsonb set: lookups stay O(log n)
            -- whatever plan the planner would pick for a join (a nested loop
            -- here would make a 10,000-row UPDATE quadratic).
            SELECT jsonb_object_agg(coalesce(n.d ->> TG_ARGV[2], '') || chr(31) || (n.d ->> TG_ARGV[1]), true)
            INTO v_keys
            FROM unnest(v_rows) AS n(d);
            SELECT array_agg(o.d ORDER BY o.ord) INTO v_moved
            FROM (SELECT to_jsonb(r) AS d, row_number() OVER () AS ord FROM relay_old_rows r) o
            WHERE NOT v_keys ? (coalesce(o.d ->> TG_ARGV[2], '') || chr(31) || coalesce(o.d ->> TG_ARGV[1], ''));
        END IF;
        IF v_moved IS NOT NULL THEN
            PERFORM relay.append(TG_ARGV[0], 'DELETE', TG_ARGV[1], TG_ARGV[2], v_moved);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- TRUNCATE fires no row triggers, so it would change a tracked table without
-- a single event (the "path that forgets to broadcast"). Refuse it.
CREATE OR REPLACE FUNCTION relay.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'relay: TRUNCATE of tracked table %.% would not be captured',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Use DELETE so that subscribers see the rows go, or call relay.disable() first.';
END
$$;

-- Start capturing a table: every committed INSERT, UPDATE and DELETE on it,
-- by any writer, becomes one event of `p_resource` in the scope read from
-- `p_scope_column`. Idempotent: calling it again replaces the triggers.
-- The triggers are ENABLE ALWAYS, so even session_replication_role =
-- replica (used by bulk loaders to skip triggers) cannot skip capture.
CREATE OR REPLACE FUNCTION relay.enable(
    p_table        regclass,
    p_resource     text,
    p_scope_column name DEFAULT 'project_id',
    p_id_column    name DEFAULT 'id'
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_col name;
BEGIN
    IF p_resource IS NULL OR p_resource !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,63}$' THEN
        RAISE EXCEPTION 'relay.enable: resource name % is not valid', quote_nullable(p_resource)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 64 letters, digits, "_", "." or "-", starting with a letter or "_".';
    END IF;
    FOREACH v_col IN ARRAY ARRAY[p_scope_column, p_id_column] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                       WHERE attrelid = p_table AND attname = v_col
                         AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'relay.enable: table % has no column %', p_table, quote_ident(v_col)
                USING ERRCODE = 'undefined_column',
                      HINT = 'Name the scope column and the id column: '
                          || 'relay.enable(table, resource, scope_column, id_column).';
        END IF;
    END LOOP;

    PERFORM relay.disable(p_table);
    EXECUTE format('CREATE TRIGGER relay_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS relay_new_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION relay.capture(%L, %L, %L)',
                   p_table, p_resource, p_scope_column, p_id_column);
    EXECUTE format('CREATE TRIGGER relay_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS relay_old_rows NEW TABLE AS relay_new_rows '
                   'FOR EACH STATEMENT '
                   'EXECUTE FUNCTION relay.capture(%L, %L, %L)',
                   p_table, p_resource, p_scope_column, p_id_column);
    EXECUTE format('CREATE TRIGGER relay_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS relay_old_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION relay.capture(%L, %L, %L)',
                   p_table, p_resource, p_scope_column, p_id_column);
    EXECUTE format('CREATE TRIGGER relay_refuse_truncate BEFORE TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION relay.refuse_truncate()', p_table);
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER relay_capture_insert, '
                   'ENABLE ALWAYS TRIGGER relay_capture_update, '
                   'ENABLE ALWAYS TRIGGER relay_capture_delete, '
                   'ENABLE ALWAYS TRIGGER relay_refuse_truncate', p_table);
END
$$;

-- Stop capturing a table. Events already in the log stay.
CREATE OR REPLACE FUNCTION relay.disable(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger name;
BEGIN
    FOR v_trigger IN
        SELECT t.tgname FROM pg_trigger t
        WHERE t.tgrelid = p_table
          AND t.tgname IN ('relay_capture_insert', 'relay_capture_update',
                           'relay_capture_delete', 'relay_refuse_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_table);
    END LOOP;
END
$$;

-- The tables being captured, with their settings, for people and tools.
CREATE OR REPLACE VIEW relay.tracked_tables AS
SELECT t.tgrelid::regclass AS table_name,
       split_part(encode(t.tgargs, 'escape'), '\000', 1) AS resource,
       split_part(encode(t.tgargs, 'escape'), '\000', 2) AS scope_column,
       split_part(encode(t.tgargs, 'escape'), '\000', 3) AS id_column,
       t.tgenabled = 'A' AS always_enabled
FROM pg_trigger t
WHERE t.tgname = 'relay_capture_insert';

-- The frames of one scope after a seq, in seq order: the single read path
-- of live delivery, resume and gap fill. At most p_limit rows and about
-- p_max_bytes of frames, but always at least one row if there is one
-- (even with p_limit 0, or a row larger than the budget), so a reader
-- always makes progress; a
-- reader's memory stays bounded whatever the rows' size; a caller that got
-- a full batch asks again from the last seq it got, so a backlog streams in
-- batches and is never held whole in memory.
-- Cost: one primary-key range scan; rows past the byte budget are rendered
-- and dropped, which only happens with very large rows.
CREATE OR REPLACE FUNCTION relay.frames_after(
    p_scope     text,
    p_after     bigint,
    p_limit     int    DEFAULT 500,
    p_max_bytes bigint DEFAULT 4194304
) RETURNS TABLE (seq bigint, created_at timestamptz, resource text, frame text)
LANGUAGE sql STABLE AS $$
    WITH batch AS (
        SELECT e.seq, e.created_at, e.resource, relay.render(e, true) AS frame
        FROM relay.events e
        WHERE e.scope = p_scope AND e.seq > p_after
        ORDER BY e.seq
        LIMIT greatest(p_limit, 1)
    ), sized AS (
        SELECT b.*, sum(octet_length(b.frame)) OVER (ORDER BY b.seq) - octet_length(b.frame) AS bytes_before
        FROM batch b
    )
    SELECT s.seq, s.created_at, s.resource, s.frame FROM sized s
    WHERE s.bytes_before < greatest(p_max_bytes, 1)
    ORDER BY s.seq
$$;

-- The same for many scopes in one round trip (each with its own limits),
-- so a burst of notices across scopes costs one query.
CREATE OR REPLACE FUNCTION relay.frames_after_many(
    p_scopes    text[],
    p_after     bigint[],
    p_limit     int    DEFAULT 500,
    p_max_bytes bigint DEFAULT 4194304
) RETURNS TABLE (scope text, seq bigint, created_at timestamptz, resource text, frame text)
LANGUAGE sql STABLE AS $$
    SELECT w.scope, f.seq, f.created_at, f.resource, f.frame
    FROM unnest(p_scopes, p_after) AS w(scope, after_seq)
    CROSS JOIN LATERAL relay.frames_after(w.scope, w.after_seq, p_limit, p_max_bytes) f
    ORDER BY w.scope, f.seq
$$;

-- Where a scope stands: the last committed seq (0 if none yet) and the
-- highest trimmed seq (0 if none). A subscriber resuming from below
-- trimmed_through must get a `reset` frame (G3).
CREATE OR REPLACE FUNCTION relay.scope_state(p_scope text)
RETURNS TABLE (latest_seq bigint, trimmed_through bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT c.last_seq FROM relay.scope_counter c WHERE c.scope = p_scope), 0),
           coalesce((SELECT h.trimmed_through FROM relay.trim_horizon h WHERE h.scope = p_scope), 0)
$$;

-- Membership: may this user receive this scope's events? The relay asks on
-- every subscribe, after every membership event and on a schedule. The rule
-- is the app's (G4): apps replace this function with their own
-- (CREATE OR REPLACE FUNCTION), so it is created here only where none
-- exists, and no install, re-install or migration ever replaces it. The
-- engine's own rule denies everyone; the chat app installs its rule only
-- over this one (migrations/chat).
DO $install_authorize$
BEGIN
    IF to_regprocedure('relay.authorize(text,text)') IS NULL THEN
        CREATE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
        LANGUAGE sql STABLE AS $rule$ SELECT false /* pgrelay default rule: denies everyone */ $rule$;
    END IF;
END
$install_authorize$;

-- Deletes up to p_batch old events and returns how many it deleted; call it
-- until it returns 0 (the relay does, from one process at a time). Never
-- runs per insert. Keeps at least p_keep_min newest events per scope and
-- everything younger than p_min_age. Oldest first per scope, so what is
-- left is a suffix, and trim_horizon records where it starts.
-- Cost: one counter scan plus one index range scan per scope.
CREATE OR REPLACE FUNCTION relay.trim(
    p_keep_min int      DEFAULT 1000,
    p_min_age  interval DEFAULT '1 hour',
    p_batch    int      DEFAULT 5000
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_deleted bigint;
BEGIN
    IF p_keep_min IS NULL OR p_keep_min < 0 OR p_batch IS NULL OR p_batch < 1 OR p_min_age IS NULL THEN
        RAISE EXCEPTION 'relay.trim: keep_min must be >= 0, batch >= 1, min_age not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH victims AS (
        SELECT v.scope, v.seq
        FROM relay.scope_counter c
        CROSS JOIN LATERAL (
            SELECT ev.scope, ev.seq FROM relay.events ev
            WHERE ev.scope = c.scope
              AND ev.seq <= c.last_seq - p_keep_min
              AND ev.created_at < now() - p_min_age
            ORDER BY ev.seq
            LIMIT p_batch) v
        LIMIT p_batch
    ), deleted AS (
        DELETE FROM relay.events ev USING victims v
        WHERE ev.scope = v.scope AND ev.seq = v.seq
        RETURNING ev.scope, ev.seq
    ), horizon AS (
        INSERT INTO relay.trim_horizon AS h (scope, trimmed_through)
        SELECT scope, max(seq) FROM deleted GROUP BY scope
        ON CONFLICT (scope) DO UPDATE
            SET trimmed_through = greatest(h.trimmed_through, excluded.trimmed_through)
    )
    SELECT count(*) INTO v_deleted FROM deleted;
    RETURN v_deleted;
END
$$;
