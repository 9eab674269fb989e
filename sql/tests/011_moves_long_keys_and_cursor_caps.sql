-- 011_moves_long_keys_and_cursor_caps.sql: edge cases found in review.
--
-- Checks that an UPDATE moving a row to another scope gives the new scope
-- its UPDATE and the old scope a DELETE carrying the row as it was (so a
-- membership moved away is seen where it was lost: G4); that a row whose
-- key is longer than NOTIFY could carry is still captured, its notice
-- leaving the key out while the frame keeps it whole; and that read and
-- delivery marks past the latest message are capped, so messages sent
-- later still count as unread.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 011_moves_long_keys_and_cursor_caps.sql postgresql://...
-- Everything is done in one transaction that is rolled back.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

SELECT set_config('sqltest.a', 'sqltest-' || gen_random_uuid(), false) AS a,
       set_config('sqltest.b', 'sqltest-' || gen_random_uuid(), false) AS b \gset

BEGIN;

INSERT INTO chat.projects (id, name) VALUES (:'a', 'sqltest moves A'), (:'b', 'sqltest moves B');
INSERT INTO chat.project_members (project_id, user_id, role)
VALUES (:'a', 'mallory', 'member'), (:'a', 'alice', 'owner'), (:'b', 'alice', 'owner');

-- Move mallory's membership from A to B.
UPDATE chat.project_members SET project_id = :'b' WHERE project_id = :'a' AND user_id = 'mallory';

DO $$
DECLARE
    v_a text := current_setting('sqltest.a');
    v_b text := current_setting('sqltest.b');
    v_old relay.events;
    v_new relay.events;
BEGIN
    SELECT * INTO v_old FROM relay.events
    WHERE scope = v_a AND resource = 'project_member' AND row_id = 'mallory' AND action = 'DELETE';
    ASSERT FOUND, 'the old scope must get a DELETE for the row that moved away';
    ASSERT v_old.data ->> 'project_id' = v_a,
        format('the DELETE carries the row as it was (project %s), got %s', v_a, v_old.data);
    SELECT * INTO v_new FROM relay.events
    WHERE scope = v_b AND resource = 'project_member' AND row_id = 'mallory' AND action = 'UPDATE';
    ASSERT FOUND, 'the new scope must get the UPDATE';
    ASSERT v_new.data ->> 'project_id' = v_b, format('the UPDATE carries the new row, got %s', v_new.data);
    ASSERT (SELECT count(*) FROM relay.events WHERE scope IN (v_a, v_b) AND row_id = 'mallory') = 3,
        'mallory: INSERT in A, DELETE in A, UPDATE in B, nothing else';
END
$$;

-- An UPDATE that keeps the scope gives no extra DELETE.
UPDATE chat.project_members SET role = 'member' WHERE project_id = :'b' AND user_id = 'mallory';
DO $$
BEGIN
    ASSERT (SELECT count(*) FROM relay.events
            WHERE scope IN (current_setting('sqltest.a'), current_setting('sqltest.b'))
              AND row_id = 'mallory' AND action = 'DELETE') = 1,
        'a role change in place must not look like a move';
END
$$;

-- A 9,000-character key: captured, the notice leaves the key out, the
-- frame has it whole.
INSERT INTO chat.messages (id, project_id, sender_id, body)
VALUES (repeat('k', 9000), :'a', 'alice', 'long key');
DO $$
DECLARE
    v_e relay.events;
    v_notice jsonb;
    v_frame jsonb;
BEGIN
    SELECT * INTO v_e FROM relay.events
    WHERE scope = current_setting('sqltest.a') AND resource = 'message' ORDER BY seq DESC LIMIT 1;
    ASSERT length(v_e.row_id) = 9000, 'the event log keeps the whole key';
    v_notice := relay.render(v_e, false)::jsonb;
    v_frame := relay.render(v_e, true)::jsonb;
    ASSERT octet_length(relay.render(v_e, false)) < 2000,
        format('the notice must stay small, is %s bytes', octet_length(relay.render(v_e, false)));
    ASSERT v_notice -> 'id' = 'null'::jsonb, 'a key over 1 KiB is left out of the notice';
    ASSERT length(v_frame ->> 'id') = 9000, 'the frame carries the whole key';
END
$$;

-- Marks past the latest message are capped.
INSERT INTO chat.project_members (project_id, user_id) VALUES (:'a', 'bob');
SELECT chat.mark_read(:'a', 'bob', 1000000) AS read_changed \gset
SELECT chat.send_message(:'a', 'alice', 'after the mark', 'c-after') IS NOT NULL AS sent \gset
DO $$
DECLARE
    v_cursor bigint;
BEGIN
    SELECT last_read_seq INTO v_cursor FROM chat.project_members
    WHERE project_id = current_setting('sqltest.a') AND user_id = 'bob';
    ASSERT v_cursor = 1, format('the read cursor is capped at the latest message (1), got %s', v_cursor);
    ASSERT chat.unread_count(current_setting('sqltest.a'), 'bob') = 1,
        'a message sent after an over-long mark is still unread';
END
$$;

ROLLBACK;

DO $$
DECLARE
    v_scopes text[] := ARRAY[current_setting('sqltest.a'), current_setting('sqltest.b')];
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM chat.projects WHERE id = ANY (v_scopes)) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scopes %', v_scopes;
    END IF;
END
$$;
