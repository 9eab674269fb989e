-- 012_any_writer_and_grants.sql: G1 (any writer) and G4 (the rule is the app's).
--
-- An application role with rights on its own table only (and its
-- sequence) writes it with INSERT, UPDATE, DELETE and COPY, and every
-- change is captured: capture needs no grant on the relay schema. The same
-- role can neither write relay.events or relay.scope_counter, nor call
-- relay.append, relay.trim or relay.declare_membership, until granted
-- (relay.grant_publisher). An app's own relay.authorize survives running
-- the install SQL again, with and without the chat app. A table declared as
-- granting membership shows in the read path's flag.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 012_any_writer_and_grants.sql postgresql://...
-- The role checks, roles included (CREATE ROLE is transactional), happen in
-- one transaction that is rolled back; the re-install checks come after it.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

BEGIN;

CREATE ROLE sqltest_app_writer NOLOGIN;
CREATE ROLE sqltest_publisher NOLOGIN;
CREATE SCHEMA sqltest_app;
CREATE TABLE sqltest_app.items (
    id         serial PRIMARY KEY,
    project_id text   NOT NULL,
    body       text
);
SELECT relay.enable('sqltest_app.items', 'item');
GRANT USAGE ON SCHEMA sqltest_app TO sqltest_app_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON sqltest_app.items TO sqltest_app_writer;
GRANT USAGE ON SEQUENCE sqltest_app.items_id_seq TO sqltest_app_writer;

-- The writer has nothing on relay.*.
DO $$
BEGIN
    ASSERT NOT has_schema_privilege('sqltest_app_writer', 'relay', 'USAGE'), 'writer has USAGE on relay';
    ASSERT NOT has_table_privilege('sqltest_app_writer', 'relay.events', 'INSERT'), 'writer may insert events';
    ASSERT NOT has_table_privilege('sqltest_app_writer', 'relay.scope_counter', 'UPDATE'), 'writer may update counters';
    ASSERT NOT has_function_privilege('sqltest_app_writer',
        'relay.append(text, text, text, text, jsonb[])', 'EXECUTE'), 'writer may call relay.append';
END
$$;

SET ROLE sqltest_app_writer;
INSERT INTO sqltest_app.items (project_id, body) VALUES ('sqltest-aw', 'one'), ('sqltest-aw', 'two');
UPDATE sqltest_app.items SET body = 'one, edited' WHERE body = 'one';
DELETE FROM sqltest_app.items WHERE body = 'two';
COPY sqltest_app.items (project_id, body) FROM stdin;
sqltest-aw	copied
\.
RESET ROLE;

DO $$
DECLARE
    v_actions text[];
    v_seqs    bigint[];
BEGIN
    SELECT array_agg(action ORDER BY seq), array_agg(seq ORDER BY seq)
    INTO v_actions, v_seqs
    FROM relay.events WHERE scope = 'sqltest-aw';
    ASSERT v_actions = ARRAY['INSERT', 'INSERT', 'UPDATE', 'DELETE', 'INSERT'],
        format('events of the app role: %s', v_actions);
    ASSERT v_seqs = ARRAY[1, 2, 3, 4, 5]::bigint[], format('seqs: %s', v_seqs);
    ASSERT (SELECT data ->> 'body' FROM relay.events WHERE scope = 'sqltest-aw' AND seq = 5) = 'copied',
        'the COPY row is captured whole';
END
$$;

-- Forging is refused, each with insufficient_privilege.
SET ROLE sqltest_app_writer;
DO $$
DECLARE
    v_attempt text;
BEGIN
    FOREACH v_attempt IN ARRAY ARRAY[
        $a$INSERT INTO relay.events (scope, seq, resource, action, data) VALUES ('sqltest-aw', 99, 'x', 'INSERT', '{}')$a$,
        $a$UPDATE relay.scope_counter SET last_seq = 0$a$,
        $a$SELECT relay.append('x', 'INSERT', 'project_id', 'id', ARRAY['{"project_id":"sqltest-aw"}'::jsonb])$a$,
        $a$SELECT relay.trim(0, '0 seconds', 10)$a$,
        $a$SELECT relay.declare_membership('item', false)$a$
    ] LOOP
        BEGIN
            EXECUTE v_attempt;
            RAISE EXCEPTION 'the app role could run: %', v_attempt;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
    END LOOP;
END
$$;
RESET ROLE;

-- Publishing is granted explicitly.
SELECT relay.grant_publisher('sqltest_publisher');
SET ROLE sqltest_publisher;
SELECT relay.append('notice', 'INSERT', 'project_id', 'id',
                    ARRAY['{"project_id":"sqltest-aw","id":"n1"}'::jsonb]);
RESET ROLE;
DO $$
BEGIN
    ASSERT (SELECT count(*) FROM relay.events WHERE scope = 'sqltest-aw' AND resource = 'notice') = 1,
        'relay.append by a granted publisher appends one event';
    ASSERT (SELECT resource FROM relay.events WHERE scope = 'sqltest-aw' AND seq = 6) = 'notice',
        'the published event is seq 6';
END
$$;

-- Membership declared in SQL shows in the read path's flag, and NULL
-- (re-running an app's relay.enable) leaves the declaration alone.
SELECT relay.enable('sqltest_app.items', 'item', p_grants_membership => true);
SELECT relay.enable('sqltest_app.items', 'item');
DO $$
BEGIN
    ASSERT (SELECT bool_and(membership) FILTER (WHERE resource = 'item')
            FROM relay.read_frames('sqltest-aw', 0)), 'item frames carry the membership flag';
    ASSERT NOT (SELECT bool_or(membership) FILTER (WHERE resource = 'notice')
                FROM relay.read_frames('sqltest-aw', 0)), 'other frames do not';
END
$$;
SELECT relay.enable('sqltest_app.items', 'item', p_grants_membership => false);
DO $$
BEGIN
    ASSERT NOT (SELECT bool_or(membership) FROM relay.read_frames('sqltest-aw', 0)),
        'withdrawn declarations clear the flag';
END
$$;

ROLLBACK;

-- An app's rule survives re-running the install SQL, engine alone and with
-- chat. The install SQL is one transaction of its own, so this part runs
-- outside the rolled-back one, in this file's own throwaway database.
CREATE OR REPLACE FUNCTION relay.authorize(user_id text, scope text) RETURNS boolean
LANGUAGE sql STABLE AS $$ SELECT user_id = 'sqltest-team-' || scope $$;
\ir ../install.sql
DO $$
BEGIN
    ASSERT relay.authorize('sqltest-team-x', 'x') AND NOT relay.authorize('alice', 'x'),
        'the app rule survived the engine install SQL';
END
$$;
\ir ../install-with-chat.sql
DO $$
BEGIN
    ASSERT relay.authorize('sqltest-team-x', 'x') AND NOT relay.authorize('alice', 'x'),
        'the app rule survived the install SQL with the chat app';
    ASSERT (SELECT count(*) FROM relay.tracked_tables WHERE table_name = 'chat.messages'::regclass) = 1,
        'the re-install left capture in place';
END
$$;
