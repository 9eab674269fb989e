-- 003_copy.sql: G1 Capture for COPY, the bulk-load path.
--
-- Checks that COPY ... FROM stdin into a tracked table yields exactly one
-- event per copied row (chat.project_members and chat.messages), with dense
-- seqs in the order of the data, the right resource, action and row_id, and
-- data = the row as stored (with the message seq set by the BEFORE trigger
-- and escaped characters intact); and that a COPY of zero rows yields none.
--
-- COPY data lines are not expanded by psql, so this file cannot use a random
-- project id: it uses the fixed id below, which no real project is expected
-- to have, and checks first that nothing of it exists. The transaction is
-- rolled back, so the id is never committed; a concurrent run of this same
-- file simply waits for the other one to finish.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 003_copy.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;
SET client_encoding = 'UTF8';  -- the data below is UTF-8

SELECT set_config('sqltest.p', 'sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3', false) AS p \gset

BEGIN;

-- The fixed scope must be unused.
DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
BEGIN
    IF EXISTS (SELECT 1 FROM chat.projects WHERE id = v_p)
       OR (SELECT latest_seq FROM relay.scope_state(v_p)) <> 0 THEN
        RAISE EXCEPTION 'the fixed test scope % already has data; this test needs it unused', v_p;
    END IF;
END
$$;

INSERT INTO chat.projects (id, name) VALUES (:'p', 'sqltest copy');                -- seq 1

-- Two members by COPY: seqs 2 and 3.
COPY chat.project_members (project_id, user_id, role) FROM stdin;
sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3	alice	owner
sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3	bob	member
\.

-- Five messages by COPY: seqs 4 to 8. Line 3 holds a tab, line 4 a
-- backslash and a newline (COPY text escapes), line 5 non-ASCII text.
COPY chat.messages (project_id, sender_id, body) FROM stdin;
sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3	alice	copied 1
sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3	bob	copied 2
sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3	alice	copied\t3
sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3	bob	copied\\4\nline two
sqltest-copy-3d2f6c1e-8a4b-4f0e-9c61-2b7a5d90e4f3	alice	copied 5 ✓ äöü 日本
\.

-- A COPY of no rows: no event.
COPY chat.messages (project_id, sender_id, body) FROM stdin;
\.

DO $$
DECLARE
    v_p      text := current_setting('sqltest.p');
    v_m      chat.messages;
    v_n      bigint;
    v_seqs   bigint[];
    v_bodies text[];
BEGIN
    -- Exactly 1 + 2 + 5 events, dense.
    SELECT array_agg(seq ORDER BY seq) INTO v_seqs FROM relay.events WHERE scope = v_p;
    ASSERT v_seqs = ARRAY[1, 2, 3, 4, 5, 6, 7, 8]::bigint[],
        format('expected seqs 1..8 (project, 2 copied members, 5 copied messages), found %s', v_seqs);
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = 8,
        'expected scope_state latest_seq 8';

    -- The members: one INSERT each, in the data's order, with the row.
    ASSERT (SELECT array_agg(row_id ORDER BY seq) FROM relay.events
            WHERE scope = v_p AND seq IN (2, 3) AND resource = 'project_member' AND action = 'INSERT')
           = ARRAY['alice', 'bob'],
        'copied members: expected project_member INSERT events for alice then bob at seqs 2, 3';
    SELECT count(*) INTO v_n FROM relay.events e JOIN chat.project_members m
        ON m.project_id = v_p AND m.user_id = e.row_id
       AND e.data = to_jsonb(m) - ARRAY['last_delivered_seq', 'last_read_seq']
    WHERE e.scope = v_p AND e.seq IN (2, 3);
    ASSERT v_n = 2, format('copied members: expected 2 events with the stored rows, found %s', v_n);

    -- The messages: 5 rows, each with exactly one INSERT event holding it.
    ASSERT (SELECT count(*) FROM chat.messages WHERE project_id = v_p) = 5,
        'expected 5 copied messages';
    FOR v_m IN SELECT * FROM chat.messages WHERE project_id = v_p LOOP
        SELECT count(*) INTO v_n FROM relay.events e
        WHERE e.scope = v_p AND e.row_id = v_m.id;
        ASSERT v_n = 1, format('copied message %s: expected exactly 1 event, found %s', v_m.body, v_n);
        SELECT count(*) INTO v_n FROM relay.events e
        WHERE e.scope = v_p AND e.row_id = v_m.id AND e.resource = 'message'
          AND e.action = 'INSERT' AND e.data = to_jsonb(v_m) AND e.seq = v_m.seq + 3;
        ASSERT v_n = 1,
            format('copied message %s (message seq %s): expected its INSERT event at seq %s with the stored row',
                   v_m.body, v_m.seq, v_m.seq + 3);
    END LOOP;

    -- In the data's order, with escapes decoded, and the data equal to it.
    SELECT array_agg(data ->> 'body' ORDER BY seq) INTO v_bodies
    FROM relay.events WHERE scope = v_p AND seq BETWEEN 4 AND 8;
    ASSERT v_bodies = ARRAY['copied 1', 'copied 2', E'copied\t3', E'copied\\4\nline two', 'copied 5 ✓ äöü 日本'],
        format('copied messages: expected the 5 bodies in data order, found %s', v_bodies);
END
$$;

ROLLBACK;

-- After the rollback nothing of this scope is left.
DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = v_p)
       OR EXISTS (SELECT 1 FROM relay.scope_counter WHERE scope = v_p)
       OR EXISTS (SELECT 1 FROM chat.projects WHERE id = v_p) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scope %, found rows', v_p;
    END IF;
END
$$;
