-- 010_enable_disable.sql: attaching the engine to a table (relay.enable and
-- relay.disable), and the guards that keep capture complete (G1).
--
-- Checks that relay.enable refuses a table without the scope or id column
-- (42703) and an invalid resource name (22023) without attaching anything;
-- that on a scratch table created by this test it works with a custom scope
-- and id column (and with the defaults project_id and id), is idempotent,
-- shows in relay.tracked_tables, attaches ENABLE ALWAYS triggers, and
-- captures INSERT, UPDATE and DELETE into each row's scope with row_id = the
-- id column as text; that a row whose scope is NULL, or longer than 256
-- characters, is refused (23502) and nothing of its statement is kept, as is
-- an event appended with an unknown action (23514); that
-- TRUNCATE of a tracked table (the scratch table and chat.messages) is
-- refused (0A000); that the chat tables are tracked with ALWAYS triggers;
-- and that relay.disable stops capture, keeps the logged events, allows
-- TRUNCATE again and is harmless when repeated.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 010_enable_disable.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks. The
-- TRUNCATE of chat.messages needs a brief ACCESS EXCLUSIVE lock on it (it is
-- refused before anything is removed); lock_timeout bounds the wait.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

-- Fresh scopes for the scratch tables' rows.
SELECT set_config('sqltest.s1', 'sqltest-' || gen_random_uuid(), false) AS s1,
       set_config('sqltest.s2', 'sqltest-' || gen_random_uuid(), false) AS s2,
       set_config('sqltest.s3', 'sqltest-' || gen_random_uuid(), false) AS s3 \gset

BEGIN;

-- The scratch table: scope column "tenant", id column "thing_key" (bigint).
CREATE TEMP TABLE sqltest_things (
    thing_key bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant    text,
    payload   text
);

-- relay_triggers(table): the engine's triggers on the table, as
-- "name:enabled" (enabled 'A' = ALWAYS).
CREATE FUNCTION pg_temp.relay_triggers(p_table regclass) RETURNS text[]
LANGUAGE sql AS $$
    SELECT coalesce(array_agg(tgname || ':' || tgenabled::text ORDER BY tgname), '{}')
    FROM pg_trigger WHERE tgrelid = p_table AND tgname LIKE 'relay\_%'
$$;

----------------------------------------------------------------------------
-- Refusals: missing columns (42703), bad resource names (22023).
----------------------------------------------------------------------------

-- No column project_id (the default scope column): 42703.
DO $$
BEGIN
    PERFORM relay.enable('sqltest_things', 'thing');
    RAISE EXCEPTION 'expected 42703 for relay.enable without a project_id column, but it succeeded';
EXCEPTION WHEN sqlstate '42703' THEN
    NULL;  -- expected
END
$$;

-- No column id (the default id column): 42703.
DO $$
BEGIN
    PERFORM relay.enable('sqltest_things', 'thing', 'tenant');
    RAISE EXCEPTION 'expected 42703 for relay.enable without an id column, but it succeeded';
EXCEPTION WHEN sqlstate '42703' THEN
    NULL;  -- expected
END
$$;

-- A named scope column that does not exist: 42703.
DO $$
BEGIN
    PERFORM relay.enable('sqltest_things', 'thing', 'no_such_column', 'thing_key');
    RAISE EXCEPTION 'expected 42703 for relay.enable with a missing scope column, but it succeeded';
EXCEPTION WHEN sqlstate '42703' THEN
    NULL;  -- expected
END
$$;

-- Invalid resource names: 22023 for each.
DO $$
DECLARE
    v_name text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['bad name', '', '9lives', '-dash', 'a;drop', 'quote''d', 'ünïcode',
                                  'r' || repeat('x', 64), NULL] LOOP
        BEGIN
            PERFORM relay.enable('sqltest_things', v_name, 'tenant', 'thing_key');
            RAISE EXCEPTION 'expected 22023 for relay.enable with resource name %, but it succeeded',
                quote_nullable(v_name);
        EXCEPTION WHEN sqlstate '22023' THEN
            NULL;  -- expected
        END;
    END LOOP;
END
$$;

DO $$
BEGIN
    ASSERT pg_temp.relay_triggers('sqltest_things') = '{}',
        format('after refused relay.enable calls: expected no triggers, found %s',
               pg_temp.relay_triggers('sqltest_things'));
END
$$;

-- A table that does not exist: 42P01.
DO $$
BEGIN
    PERFORM relay.enable('sqltest_no_such_table', 'thing', 'tenant', 'thing_key');
    RAISE EXCEPTION 'expected 42P01 for relay.enable on a missing table, but it succeeded';
EXCEPTION WHEN sqlstate '42P01' THEN
    NULL;  -- expected
END
$$;

----------------------------------------------------------------------------
-- Enable with a custom scope and id column; idempotent; ALWAYS triggers.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_row relay.tracked_tables;
BEGIN
    -- The longest valid name (64 characters), then the real one: calling
    -- relay.enable again replaces the triggers.
    PERFORM relay.enable('sqltest_things', 'r' || repeat('x', 63), 'tenant', 'thing_key');
    PERFORM relay.enable('sqltest_things', 'thing', 'tenant', 'thing_key');
    PERFORM relay.enable('sqltest_things', 'thing', 'tenant', 'thing_key');

    ASSERT pg_temp.relay_triggers('sqltest_things')
           = ARRAY['relay_capture_delete:A', 'relay_capture_insert:A', 'relay_capture_update:A',
                   'relay_refuse_truncate:A'],
        format('after relay.enable: expected the 4 relay triggers, all ALWAYS, found %s',
               pg_temp.relay_triggers('sqltest_things'));

    SELECT * INTO STRICT v_row FROM relay.tracked_tables t WHERE t.table_name = 'sqltest_things'::regclass;
    ASSERT v_row.resource = 'thing' AND v_row.scope_column = 'tenant' AND v_row.id_column = 'thing_key'
           AND v_row.always_enabled,
        format('tracked_tables: expected (thing, tenant, thing_key, always), found %s', to_jsonb(v_row));
END
$$;

-- The chat tables are tracked the same way.
DO $$
DECLARE
    v_tracked text[];
BEGIN
    SELECT array_agg(table_name::text || ':' || resource || ':' || scope_column || ':' || id_column
                     || ':' || always_enabled ORDER BY table_name::text) INTO v_tracked
    FROM relay.tracked_tables WHERE table_name::text LIKE 'chat.%';
    ASSERT v_tracked = ARRAY['chat.messages:message:project_id:id:true',
                             'chat.project_members:project_member:project_id:user_id:true',
                             'chat.projects:project:id:id:true'],
        format('tracked_tables: expected the three chat tables, found %s', v_tracked);
    ASSERT pg_temp.relay_triggers('chat.messages') = pg_temp.relay_triggers('sqltest_things')
           AND pg_temp.relay_triggers('chat.project_members') = pg_temp.relay_triggers('sqltest_things')
           AND pg_temp.relay_triggers('chat.projects') = pg_temp.relay_triggers('sqltest_things'),
        'chat tables: expected the same 4 ALWAYS relay triggers on each';
END
$$;

----------------------------------------------------------------------------
-- Capture on the scratch table.
----------------------------------------------------------------------------

INSERT INTO sqltest_things (tenant, payload) VALUES (:'s1', 'one'), (:'s2', 'two'), (:'s1', 'three');
UPDATE sqltest_things SET payload = 'ONE' WHERE payload = 'one';
SELECT set_config('sqltest.before', to_jsonb(t)::text, true) AS before
FROM sqltest_things t WHERE t.payload = 'two' \gset
DELETE FROM sqltest_things WHERE payload = 'two';

DO $$
DECLARE
    v_s1     text := current_setting('sqltest.s1');
    v_s2     text := current_setting('sqltest.s2');
    v_before jsonb := current_setting('sqltest.before')::jsonb;
    v_got    text[];
    v_want   text[];
BEGIN
    -- S1: INSERT one, INSERT three, UPDATE one; S2: INSERT two, DELETE two.
    SELECT array_agg(e.seq || ':' || e.resource || ':' || e.action || ':' || e.row_id || ':' || e.data::text
                     ORDER BY e.seq) INTO v_got
    FROM relay.events e WHERE e.scope = v_s1;
    SELECT array_agg(x ORDER BY n) INTO v_want FROM (
        SELECT 1 AS n, '1:thing:INSERT:' || t.thing_key || ':' || (to_jsonb(t) || '{"payload": "one"}')::text AS x
        FROM sqltest_things t WHERE t.payload = 'ONE'
        UNION ALL
        SELECT 2, '2:thing:INSERT:' || t.thing_key || ':' || to_jsonb(t)::text
        FROM sqltest_things t WHERE t.payload = 'three'
        UNION ALL
        SELECT 3, '3:thing:UPDATE:' || t.thing_key || ':' || to_jsonb(t)::text
        FROM sqltest_things t WHERE t.payload = 'ONE') w;
    ASSERT v_got = v_want, format('scope S1: expected events %s, found %s', v_want, v_got);

    SELECT array_agg(e.seq || ':' || e.action || ':' || e.row_id || ':' || e.data::text ORDER BY e.seq) INTO v_got
    FROM relay.events e WHERE e.scope = v_s2;
    v_want := ARRAY['1:INSERT:' || (v_before ->> 'thing_key') || ':' || v_before::text,
                    '2:DELETE:' || (v_before ->> 'thing_key') || ':' || v_before::text];
    ASSERT v_got = v_want, format('scope S2: expected events %s, found %s', v_want, v_got);

    -- The notice names the scope as project_id, whatever the column is called.
    ASSERT (SELECT relay.render(e, false)::jsonb ->> 'project_id' FROM relay.events e
            WHERE e.scope = v_s2 AND e.seq = 1) = v_s2,
        'scratch table notice: expected project_id to be the tenant';
END
$$;

----------------------------------------------------------------------------
-- A row without a valid scope is refused, with everything its statement did.
----------------------------------------------------------------------------

SELECT count(*) AS events_before FROM relay.events
WHERE scope IN (:'s1', :'s2', :'s3') \gset
SELECT set_config('sqltest.events_before', :'events_before', true) AS events_before \gset

-- A NULL scope: 23502.
DO $$
BEGIN
    INSERT INTO sqltest_things (tenant, payload) VALUES (NULL, 'no scope');
    RAISE EXCEPTION 'expected 23502 for a row with a NULL scope, but the INSERT succeeded';
EXCEPTION WHEN sqlstate '23502' THEN
    NULL;  -- expected
END
$$;

-- One NULL scope among valid rows: 23502 for the whole statement.
DO $$
BEGIN
    INSERT INTO sqltest_things (tenant, payload)
    VALUES (current_setting('sqltest.s3'), 'valid'), (NULL, 'no scope'), (current_setting('sqltest.s3'), 'valid');
    RAISE EXCEPTION 'expected 23502 for a statement with one NULL-scope row, but the INSERT succeeded';
EXCEPTION WHEN sqlstate '23502' THEN
    NULL;  -- expected
END
$$;

-- An UPDATE that clears the scope: 23502.
DO $$
BEGIN
    UPDATE sqltest_things SET tenant = NULL WHERE payload = 'three';
    RAISE EXCEPTION 'expected 23502 for an UPDATE to a NULL scope, but it succeeded';
EXCEPTION WHEN sqlstate '23502' THEN
    NULL;  -- expected
END
$$;

-- A scope longer than 256 characters: 23502.
DO $$
BEGIN
    INSERT INTO sqltest_things (tenant, payload) VALUES (rpad(current_setting('sqltest.s3'), 257, '.'), 'long scope');
    RAISE EXCEPTION 'expected 23502 for a 257-character scope, but the INSERT succeeded';
EXCEPTION WHEN sqlstate '23502' THEN
    NULL;  -- expected
END
$$;

-- relay.append called by an app with an action that is not INSERT, UPDATE
-- or DELETE: 23514, and no event.
DO $$
BEGIN
    PERFORM relay.append('sqltest_thing', 'UPSERT', 'scope', 'id',
                         ARRAY[jsonb_build_object('scope', current_setting('sqltest.s3'), 'id', 1)]);
    RAISE EXCEPTION 'expected 23514 for relay.append with action UPSERT, but it succeeded';
EXCEPTION WHEN sqlstate '23514' THEN
    NULL;  -- expected
END
$$;

-- None of the refused statements left a row, a change or an event.
DO $$
DECLARE
    v_s1 text := current_setting('sqltest.s1');
    v_s3 text := current_setting('sqltest.s3');
BEGIN
    ASSERT (SELECT count(*) FROM sqltest_things WHERE payload IN ('no scope', 'valid', 'long scope')) = 0,
        'refused rows: expected none of them in the table';
    ASSERT (SELECT count(*) FROM sqltest_things WHERE payload = 'three' AND tenant = v_s1) = 1,
        'refused UPDATE: expected the row unchanged';
    ASSERT (SELECT count(*) FROM relay.events WHERE scope IN (current_setting('sqltest.s1'),
                current_setting('sqltest.s2'), v_s3)) = current_setting('sqltest.events_before')::bigint,
        'refused rows: expected no new events';
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_s3)) = 0,
        'refused rows: expected no seq handed out in S3';
END
$$;

-- Exactly 256 characters is accepted.
INSERT INTO sqltest_things (tenant, payload) VALUES (rpad(:'s3', 256, '.'), 'long but fine');

DO $$
BEGIN
    ASSERT (SELECT count(*) FROM relay.events WHERE scope = rpad(current_setting('sqltest.s3'), 256, '.')
              AND seq = 1 AND data ->> 'payload' = 'long but fine') = 1,
        'a 256-character scope: expected it to be captured';
END
$$;

----------------------------------------------------------------------------
-- TRUNCATE of a tracked table is refused (0A000).
----------------------------------------------------------------------------

DO $$
BEGIN
    TRUNCATE sqltest_things;
    RAISE EXCEPTION 'expected 0A000 for TRUNCATE of a tracked table, but it succeeded';
EXCEPTION WHEN sqlstate '0A000' THEN
    NULL;  -- expected
END
$$;

-- chat.messages is referenced by no foreign key, so the refusal can only
-- come from the relay trigger.
SET LOCAL lock_timeout = '10s';

DO $$
BEGIN
    TRUNCATE chat.messages;
    RAISE EXCEPTION 'expected 0A000 for TRUNCATE of chat.messages, but it succeeded';
EXCEPTION WHEN sqlstate '0A000' THEN
    NULL;  -- expected
END
$$;

RESET lock_timeout;

DO $$
BEGIN
    ASSERT (SELECT count(*) FROM sqltest_things) = 3,
        format('after the refused TRUNCATE: expected 3 rows still there, found %s',
               (SELECT count(*) FROM sqltest_things));
END
$$;

----------------------------------------------------------------------------
-- The default columns: project_id and id.
----------------------------------------------------------------------------

CREATE TEMP TABLE sqltest_widgets (
    id         text PRIMARY KEY,
    project_id text NOT NULL,
    colour     text
);

DO $$
BEGIN
    PERFORM relay.enable('sqltest_widgets', 'widget');
END
$$;

INSERT INTO sqltest_widgets (id, project_id, colour) VALUES ('w-1', :'s3', 'red');

DO $$
DECLARE
    v_s3 text := current_setting('sqltest.s3');
BEGIN
    ASSERT (SELECT count(*) FROM relay.events e
            WHERE e.scope = v_s3 AND e.seq = 1 AND e.resource = 'widget' AND e.action = 'INSERT'
              AND e.row_id = 'w-1' AND e.data = '{"id": "w-1", "colour": "red"}'::jsonb
                                              || jsonb_build_object('project_id', v_s3)) = 1,
        'default columns: expected a widget INSERT event for w-1 at seq 1 of S3';
END
$$;

----------------------------------------------------------------------------
-- relay.disable stops capture, keeps the log, and allows TRUNCATE again.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_s1     text := current_setting('sqltest.s1');
    v_before bigint;
BEGIN
    SELECT latest_seq INTO v_before FROM relay.scope_state(v_s1);
    PERFORM relay.disable('sqltest_things');
    PERFORM relay.disable('sqltest_things');  -- again: harmless

    ASSERT pg_temp.relay_triggers('sqltest_things') = '{}',
        format('after relay.disable: expected no relay triggers, found %s', pg_temp.relay_triggers('sqltest_things'));
    ASSERT NOT EXISTS (SELECT 1 FROM relay.tracked_tables WHERE table_name = 'sqltest_things'::regclass),
        'after relay.disable: expected the table gone from tracked_tables';

    INSERT INTO sqltest_things (tenant, payload) VALUES (v_s1, 'untracked');
    UPDATE sqltest_things SET payload = 'untracked too' WHERE tenant = v_s1;
    INSERT INTO sqltest_things (tenant, payload) VALUES (NULL, 'no scope, no capture');
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_s1)) = v_before
           AND (SELECT count(*) FROM relay.events WHERE scope = v_s1) = v_before,
        format('after relay.disable: expected S1 to stay at %s events, found latest %s',
               v_before, (SELECT latest_seq FROM relay.scope_state(v_s1)));

    TRUNCATE sqltest_things;
    ASSERT (SELECT count(*) FROM relay.events WHERE scope = v_s1) = v_before,
        'after relay.disable and TRUNCATE: expected the logged events of S1 to stay';

    -- The other tracked tables are unaffected.
    ASSERT EXISTS (SELECT 1 FROM relay.tracked_tables WHERE table_name = 'sqltest_widgets'::regclass)
           AND EXISTS (SELECT 1 FROM relay.tracked_tables WHERE table_name = 'chat.messages'::regclass),
        'after relay.disable of one table: expected the others still tracked';
END
$$;

ROLLBACK;

-- After the rollback nothing of these scopes is left.
DO $$
DECLARE
    v_scopes text[] := ARRAY[current_setting('sqltest.s1'), current_setting('sqltest.s2'),
                             current_setting('sqltest.s3'), rpad(current_setting('sqltest.s3'), 256, '.')];
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM relay.scope_counter WHERE scope = ANY (v_scopes)) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scopes %, found rows', v_scopes;
    END IF;
END
$$;
