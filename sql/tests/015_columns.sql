-- 015_columns.sql: columns chosen in SQL at capture (DESIGN.md G10).
--
-- On a scratch accounts table (id, project_id, name, email, pw_hash, note)
-- checks, for INSERT, UPDATE and DELETE, single-row and multi-row
-- statements, that:
-- - a deny-list (p_exclude_columns) keeps every column but those: the
--   excluded ones are absent from relay.events.data, from the rendered
--   frame (relay.render) and from the notice (relay.render(e, false));
-- - an allow-list (p_columns) keeps only those, with the id and scope;
-- - id-only (p_row_data => false) keeps no data at all: data IS NULL and
--   the frame has no "data" key, but the id and scope;
-- - under a list, an UPDATE that touched only left-out columns is no event
--   (for one row, and for the rows of a multi-row UPDATE that did), and any
--   visible change of a chosen column is;
-- - without a list, id-only events come for every UPDATE;
-- - a change of the choice takes effect for the next statement, a re-run
--   of relay.enable without a choice keeps the table's choice, and
--   p_exclude_columns => '{}' goes back to every column; relay.tracked_columns
--   shows each choice;
-- - unknown columns (42703), both lists (22023), an excluded id or scope
--   column (22023) and a NULL in a list (22004) are refused and leave the
--   table's choice as it was;
-- - a choice gives the table a capture function of its own, written with
--   column names that need quoting, and dropped when the choice or the
--   tracking ends.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 015_columns.sql postgresql://...
-- Everything is done in one transaction that is rolled back.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

SELECT set_config('sqltest.s1', 'sqltest-' || gen_random_uuid(), false) AS s1 \gset

BEGIN;

CREATE TEMP TABLE sqltest_accounts (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id text NOT NULL,
    name       text,
    email      text,
    pw_hash    text,
    note       text
);

-- The keys of the data of the scope's events after seq p_after, one text
-- per event, in seq order ('<null>' for an event without data).
CREATE FUNCTION pg_temp.keys_after(p_after bigint) RETURNS text[]
LANGUAGE sql AS $$
    SELECT coalesce(array_agg(
               CASE WHEN e.data IS NULL THEN '<null>'
                    ELSE (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(e.data) k) END
               ORDER BY e.seq), '{}')
    FROM relay.events e
    WHERE e.scope = current_setting('sqltest.s1') AND e.seq > p_after
$$;

-- The scope's latest seq (0 before its first event).
CREATE FUNCTION pg_temp.latest() RETURNS bigint
LANGUAGE sql AS $$
    SELECT coalesce(max(seq), 0) FROM relay.events WHERE scope = current_setting('sqltest.s1')
$$;

-- Whether any rendered frame or notice of the scope's events after p_after
-- holds p_text.
CREATE FUNCTION pg_temp.rendered_holds(p_after bigint, p_text text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM relay.events e
                   WHERE e.scope = current_setting('sqltest.s1') AND e.seq > p_after
                     AND (strpos(relay.render(e), p_text) > 0 OR strpos(relay.render(e, false), p_text) > 0))
$$;

-- The accounts table's choice as relay.tracked_columns shows it:
-- (column_choice, chosen_columns, row_data).
CREATE FUNCTION pg_temp.choice() RETURNS text
LANGUAGE sql AS $$
    SELECT (column_choice, chosen_columns, row_data)::text FROM relay.tracked_columns
    WHERE table_name = 'sqltest_accounts'::regclass
$$;

----------------------------------------------------------------------------
-- Deny-list.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_s    text := current_setting('sqltest.s1');
    v_from bigint;
    v_keys text[];
BEGIN
    PERFORM relay.enable('sqltest_accounts', 'account', p_exclude_columns => ARRAY['pw_hash', 'note']);
    ASSERT pg_temp.choice() = '(except,"{note,pw_hash}",t)',
        'deny-list: relay.tracked_columns shows the choice';

    v_from := pg_temp.latest();
    INSERT INTO sqltest_accounts (project_id, name, email, pw_hash, note)
    VALUES (v_s, 'ann', 'ann@example.com', 'HASH-SECRET-1', 'NOTE-SECRET-1');
    INSERT INTO sqltest_accounts (project_id, name, email, pw_hash, note)
    SELECT v_s, 'user' || i, 'u' || i || '@example.com', 'HASH-SECRET-M' || i, 'NOTE-SECRET-M' || i
    FROM generate_series(1, 3) i;
    v_keys := pg_temp.keys_after(v_from);
    ASSERT v_keys = array_fill('email,id,name,project_id'::text, ARRAY[4]),
        format('deny-list inserts: expected 4 events with id, project_id, name, email; found %s', v_keys);

    -- A visible change of a kept column: an event, without the secrets.
    v_from := pg_temp.latest();
    UPDATE sqltest_accounts SET name = 'ann2' WHERE name = 'ann';
    ASSERT pg_temp.keys_after(v_from) = ARRAY['email,id,name,project_id'],
        format('deny-list update of name: expected one event, found %s', pg_temp.keys_after(v_from));

    -- Only excluded columns changed: no event, for one row and for many.
    v_from := pg_temp.latest();
    UPDATE sqltest_accounts SET pw_hash = 'HASH-SECRET-2' WHERE name = 'ann2';
    UPDATE sqltest_accounts SET note = 'NOTE-SECRET-2', pw_hash = 'HASH-SECRET-3' WHERE name LIKE 'user%';
    ASSERT pg_temp.latest() = v_from,
        format('deny-list updates of excluded columns only: expected no event, found %s',
               pg_temp.keys_after(v_from));

    -- A multi-row UPDATE where one row changed a kept column and the others
    -- only excluded ones: one event, for that row.
    UPDATE sqltest_accounts SET pw_hash = 'HASH-SECRET-4',
                                email = CASE WHEN name = 'user2' THEN 'new2@example.com' ELSE email END
    WHERE name LIKE 'user%';
    ASSERT (SELECT array_agg(row_id) FROM relay.events WHERE scope = v_s AND seq > v_from)
           = ARRAY[(SELECT id::text FROM sqltest_accounts WHERE name = 'user2')],
        format('deny-list multi-row update: expected one event for user2, found %s',
               (SELECT array_agg(row_id) FROM relay.events WHERE scope = v_s AND seq > v_from));

    -- DELETE carries the row as it was, cut the same way.
    v_from := pg_temp.latest();
    DELETE FROM sqltest_accounts WHERE name IN ('ann2', 'user1');
    ASSERT pg_temp.keys_after(v_from) = array_fill('email,id,name,project_id'::text, ARRAY[2])
           AND (SELECT bool_and(action = 'DELETE') FROM relay.events WHERE scope = v_s AND seq > v_from),
        format('deny-list deletes: expected 2 DELETE events without the secrets, found %s',
               pg_temp.keys_after(v_from));

    ASSERT NOT pg_temp.rendered_holds(0, 'SECRET'),
        'deny-list: an excluded value reached a rendered frame or notice';
    ASSERT NOT EXISTS (SELECT 1 FROM relay.events WHERE scope = v_s AND data::text LIKE '%SECRET%'),
        'deny-list: an excluded value reached relay.events';

    -- A row moved to another scope under a deny-list: its old scope gets a
    -- DELETE, its new one the UPDATE, both cut.
    v_from := pg_temp.latest();
    UPDATE sqltest_accounts SET project_id = v_s || '-moved' WHERE name = 'user3';
    ASSERT (SELECT array_agg(action || ':' || (data ? 'pw_hash')::text ORDER BY seq) FROM relay.events
            WHERE scope = v_s AND seq > v_from) = ARRAY['DELETE:false'],
        'a move under a deny-list: expected one cut DELETE in the old scope';
    ASSERT (SELECT array_agg(action || ':' || (data ? 'pw_hash')::text) FROM relay.events
            WHERE scope = v_s || '-moved') = ARRAY['UPDATE:false'],
        'a move under a deny-list: expected one cut UPDATE in the new scope';

    -- Re-running relay.enable without a choice keeps it (it never widens).
    PERFORM relay.enable('sqltest_accounts', 'account');
    v_from := pg_temp.latest();
    INSERT INTO sqltest_accounts (project_id, name, pw_hash) VALUES (v_s, 'bob', 'HASH-SECRET-5');
    ASSERT pg_temp.keys_after(v_from) = ARRAY['email,id,name,project_id'],
        format('relay.enable without a choice: expected the deny-list kept, found %s', pg_temp.keys_after(v_from));
END
$$;

----------------------------------------------------------------------------
-- Refusals leave the choice as it was.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_case record;
BEGIN
    FOR v_case IN
        SELECT * FROM (VALUES
            ('42703', 'unknown column in p_columns',
             $q$SELECT relay.enable('sqltest_accounts', 'account', p_columns => ARRAY['name', 'no_such'])$q$),
            ('42703', 'unknown column in p_exclude_columns',
             $q$SELECT relay.enable('sqltest_accounts', 'account', p_exclude_columns => ARRAY['passwd'])$q$),
            ('22023', 'both lists',
             $q$SELECT relay.enable('sqltest_accounts', 'account', p_columns => ARRAY['name'],
                                    p_exclude_columns => ARRAY['note'])$q$),
            ('22023', 'the id column excluded',
             $q$SELECT relay.enable('sqltest_accounts', 'account', p_exclude_columns => ARRAY['id'])$q$),
            ('22023', 'the scope column excluded',
             $q$SELECT relay.enable('sqltest_accounts', 'account', p_exclude_columns => ARRAY['project_id'])$q$),
            ('22004', 'a NULL in a list',
             $q$SELECT relay.enable('sqltest_accounts', 'account', p_columns => ARRAY['name', NULL])$q$)
        ) AS c(code, what, stmt)
    LOOP
        BEGIN
            EXECUTE v_case.stmt;
            RAISE EXCEPTION 'expected % for relay.enable with %, but it succeeded', v_case.code, v_case.what;
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE <> v_case.code THEN
                RAISE EXCEPTION 'relay.enable with %: expected %, got % (%)', v_case.what, v_case.code,
                    SQLSTATE, SQLERRM;
            END IF;
        END;
    END LOOP;
    ASSERT pg_temp.choice() = '(except,"{note,pw_hash}",t)',
        'after refused relay.enable calls: expected the deny-list unchanged';
END
$$;

----------------------------------------------------------------------------
-- Allow-list; the change takes effect for the next statement.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_s    text := current_setting('sqltest.s1');
    v_from bigint;
BEGIN
    PERFORM relay.enable('sqltest_accounts', 'account', p_columns => ARRAY['name', 'id']);
    ASSERT pg_temp.choice() = '(only,{name},t)',
        'allow-list: relay.tracked_columns shows the choice (id and scope implied)';

    v_from := pg_temp.latest();
    INSERT INTO sqltest_accounts (project_id, name, email, pw_hash)
    SELECT v_s, 'carol' || i, 'SECRET-MAIL-' || i, 'HASH-SECRET-6' FROM generate_series(1, 2) i;
    UPDATE sqltest_accounts SET name = 'carol9' WHERE name = 'carol1';
    -- email is not chosen now: its change alone is no event.
    UPDATE sqltest_accounts SET email = 'SECRET-MAIL-9' WHERE name LIKE 'carol%';
    DELETE FROM sqltest_accounts WHERE name = 'carol2';
    ASSERT pg_temp.keys_after(v_from) = array_fill('id,name,project_id'::text, ARRAY[4]),
        format('allow-list: expected 2 inserts, 1 update, 1 delete with id, project_id, name; found %s',
               pg_temp.keys_after(v_from));
    ASSERT NOT pg_temp.rendered_holds(v_from, 'SECRET'),
        'allow-list: a column left out reached a rendered frame or notice';

    -- Back to every column: the next event carries them all.
    PERFORM relay.enable('sqltest_accounts', 'account', p_exclude_columns => '{}');
    v_from := pg_temp.latest();
    UPDATE sqltest_accounts SET note = 'visible now' WHERE name = 'carol9';
    ASSERT pg_temp.keys_after(v_from) = ARRAY['email,id,name,note,project_id,pw_hash'],
        format('p_exclude_columns => {}: expected every column, found %s', pg_temp.keys_after(v_from));
    ASSERT (SELECT column_choice FROM relay.tracked_columns
            WHERE table_name = 'sqltest_accounts'::regclass) = 'all',
        'p_exclude_columns => {}: relay.tracked_columns shows all';
    -- Without a choice the table is back on relay.capture, and its own
    -- capture function is gone.
    ASSERT (SELECT array_agg(DISTINCT tgfoid::regproc::text) FROM pg_trigger
            WHERE tgrelid = 'sqltest_accounts'::regclass AND tgname LIKE 'relay_capture_%')
           = ARRAY['relay.capture'],
        'without a choice: expected the triggers to run relay.capture';
    ASSERT to_regproc('relay.capture_' || 'sqltest_accounts'::regclass::oid) IS NULL,
        'without a choice: expected the table''s own capture function dropped';
END
$$;

----------------------------------------------------------------------------
-- Id-only events.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_s     text := current_setting('sqltest.s1');
    v_from  bigint;
    v_frame jsonb;
    v_id    bigint;
BEGIN
    PERFORM relay.enable('sqltest_accounts', 'account', p_row_data => false);
    ASSERT (SELECT row_data FROM relay.tracked_columns WHERE table_name = 'sqltest_accounts'::regclass) = false,
        'id-only: relay.tracked_columns shows row_data false';

    v_from := pg_temp.latest();
    INSERT INTO sqltest_accounts (project_id, name, pw_hash) VALUES (v_s, 'dave', 'HASH-SECRET-7')
    RETURNING id INTO v_id;
    INSERT INTO sqltest_accounts (project_id, name) SELECT v_s, 'erin' || i FROM generate_series(1, 3) i;
    -- Without a list every UPDATE is an event ("this row changed").
    UPDATE sqltest_accounts SET pw_hash = 'HASH-SECRET-8' WHERE id = v_id;
    DELETE FROM sqltest_accounts WHERE name LIKE 'erin%';
    ASSERT pg_temp.keys_after(v_from) = array_fill('<null>'::text, ARRAY[8]),
        format('id-only: expected 8 events without data, found %s', pg_temp.keys_after(v_from));

    SELECT relay.render(e)::jsonb INTO STRICT v_frame FROM relay.events e
    WHERE e.scope = v_s AND e.seq = v_from + 5;
    ASSERT NOT v_frame ? 'data' AND v_frame ->> 'id' = v_id::text AND v_frame ->> 'action' = 'UPDATE'
           AND v_frame ->> 'project_id' = v_s AND v_frame ->> 'resource' = 'account',
        format('id-only: expected a frame with id, action, project_id and no data, found %s', v_frame);
    ASSERT NOT pg_temp.rendered_holds(v_from, 'SECRET'),
        'id-only: row data reached a rendered frame or notice';

    -- Id-only with a deny-list: an update of excluded columns only is no
    -- event; of a kept one, an event without data.
    PERFORM relay.enable('sqltest_accounts', 'account', p_exclude_columns => ARRAY['pw_hash']);
    ASSERT (SELECT (column_choice, row_data)::text FROM relay.tracked_columns
            WHERE table_name = 'sqltest_accounts'::regclass) = '(except,f)',
        'a new list keeps id-only (p_row_data not given)';
    v_from := pg_temp.latest();
    UPDATE sqltest_accounts SET pw_hash = 'HASH-SECRET-9' WHERE id = v_id;
    UPDATE sqltest_accounts SET name = 'dave2' WHERE id = v_id;
    ASSERT pg_temp.keys_after(v_from) = ARRAY['<null>'],
        format('id-only with a deny-list: expected one event without data, found %s', pg_temp.keys_after(v_from));

    -- And back to row data, with the list kept.
    PERFORM relay.enable('sqltest_accounts', 'account', p_row_data => true);
    v_from := pg_temp.latest();
    UPDATE sqltest_accounts SET name = 'dave3' WHERE id = v_id;
    ASSERT pg_temp.keys_after(v_from) = ARRAY['email,id,name,note,project_id'],
        format('p_row_data => true: expected data without pw_hash, found %s', pg_temp.keys_after(v_from));
END
$$;

----------------------------------------------------------------------------
-- Column names that need quoting, in both lists; relay.disable drops the
-- table's own capture function.
----------------------------------------------------------------------------

CREATE TEMP TABLE sqltest_odd (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id  text NOT NULL,
    "Odd, Name" text,
    "it's"      text,
    "x}{"       text
);

DO $$
DECLARE
    v_start bigint := pg_temp.latest();
    v_from  bigint := v_start;
    v_s     text := current_setting('sqltest.s1');
BEGIN
    PERFORM relay.enable('sqltest_odd', 'odd', p_exclude_columns => ARRAY['Odd, Name', 'x}{']);
    INSERT INTO sqltest_odd (project_id, "Odd, Name", "it's", "x}{") VALUES (v_s, 'SECRET-A', 'kept', 'SECRET-B');
    ASSERT pg_temp.keys_after(v_from) = ARRAY['id,it''s,project_id'],
        format('odd names, deny-list: found %s', pg_temp.keys_after(v_from));
    PERFORM relay.enable('sqltest_odd', 'odd', p_columns => ARRAY['Odd, Name', 'it''s']);
    v_from := pg_temp.latest();
    INSERT INTO sqltest_odd (project_id, "Odd, Name", "it's", "x}{") VALUES (v_s, 'a', 'b', 'SECRET-C');
    ASSERT pg_temp.keys_after(v_from) = ARRAY['Odd, Name,id,it''s,project_id'],
        format('odd names, allow-list: found %s', pg_temp.keys_after(v_from));
    ASSERT NOT pg_temp.rendered_holds(v_start, 'SECRET'), 'odd names: a left-out value was sent';
    ASSERT to_regproc('relay.capture_' || 'sqltest_odd'::regclass::oid) IS NOT NULL,
        'a choice: expected the table''s own capture function';
    ASSERT (SELECT p.proowner = c.proowner AND p.prosecdef
            FROM pg_proc p, pg_proc c
            WHERE p.oid = to_regproc('relay.capture_' || 'sqltest_odd'::regclass::oid)
              AND c.oid = 'relay.capture()'::regprocedure),
        'a choice: expected the table''s capture function SECURITY DEFINER, owned as relay.capture is';
    PERFORM relay.disable('sqltest_odd');
    ASSERT to_regproc('relay.capture_' || 'sqltest_odd'::regclass::oid) IS NULL,
        'relay.disable: expected the table''s own capture function dropped';
END
$$;

ROLLBACK;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope IN (current_setting('sqltest.s1'),
                                                          current_setting('sqltest.s1') || '-moved')) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scope %', current_setting('sqltest.s1');
    END IF;
END
$$;
