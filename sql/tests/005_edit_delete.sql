-- 005_edit_delete.sql: compare-and-swap edits and soft deletes (incident 6:
-- permission checked outside the write's transaction).
--
-- Checks chat.edit_message: the sender with the current version edits the
-- body, bumps the version, sets edited_at and emits one UPDATE event; a
-- stale version raises PR409; a member who is not the sender (even the
-- owner) or a non-member raises 42501; an unknown id raises P0002; an empty
-- body or a NULL version raises 22023. Checks chat.delete_message: the
-- sender soft-deletes (deleted_at set, body cleared, version bumped, the row
-- stays) and that is one UPDATE event, not a DELETE; a member who is not the
-- sender raises 42501, a non-member 42501; the project owner may delete
-- another's message; a stale version raises PR409; deleting twice, or
-- editing a deleted message, raises P0002. Every refusal leaves the row and
-- the event log unchanged.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 005_edit_delete.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

SELECT set_config('sqltest.p', 'sqltest-' || gen_random_uuid(), false) AS p \gset

BEGIN;

-- Fixture: alice owns the project; bob and carol are members; mallory is
-- not. bob and carol each send a message.
INSERT INTO chat.projects (id, name) VALUES (:'p', 'sqltest edit and delete');
INSERT INTO chat.project_members (project_id, user_id, role)
VALUES (:'p', 'alice', 'owner'), (:'p', 'bob', 'member'), (:'p', 'carol', 'member');

SELECT (s.message).id AS bob_msg FROM chat.send_message(:'p', 'bob', 'original', 'bob-1') s \gset
SELECT (s.message).id AS carol_msg FROM chat.send_message(:'p', 'carol', 'carol says', 'carol-1') s \gset
SELECT set_config('sqltest.bob_msg', :'bob_msg', true) AS bob_msg,
       set_config('sqltest.carol_msg', :'carol_msg', true) AS carol_msg \gset

-- pg_temp.unchanged(what) asserts that the message rows and the event log of
-- the scope are as they were at the last pg_temp.snapshot().
CREATE TEMP TABLE snap (rows jsonb, latest bigint);

CREATE FUNCTION pg_temp.snapshot() RETURNS void
LANGUAGE sql AS $$
    DELETE FROM snap;
    INSERT INTO snap
    SELECT (SELECT jsonb_agg(to_jsonb(m) ORDER BY m.seq) FROM chat.messages m
            WHERE m.project_id = current_setting('sqltest.p')),
           (SELECT latest_seq FROM relay.scope_state(current_setting('sqltest.p')));
$$;

CREATE FUNCTION pg_temp.unchanged(p_what text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_rows   jsonb;
    v_latest bigint;
BEGIN
    SELECT jsonb_agg(to_jsonb(m) ORDER BY m.seq) INTO v_rows FROM chat.messages m
    WHERE m.project_id = current_setting('sqltest.p');
    SELECT latest_seq INTO v_latest FROM relay.scope_state(current_setting('sqltest.p'));
    ASSERT v_rows = (SELECT rows FROM snap),
        format('%s: expected the messages unchanged, found %s', p_what, v_rows);
    ASSERT v_latest = (SELECT latest FROM snap),
        format('%s: expected no new event (latest seq %s), found latest seq %s',
               p_what, (SELECT latest FROM snap), v_latest);
END
$$;

----------------------------------------------------------------------------
-- Edit with the current version: body, version, edited_at, one UPDATE event.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p      text := current_setting('sqltest.p');
    v_id     text := current_setting('sqltest.bob_msg');
    v_before bigint;
    v_m      chat.messages;
    v_stored chat.messages;
BEGIN
    SELECT latest_seq INTO v_before FROM relay.scope_state(v_p);
    v_m := chat.edit_message(v_id, 'bob', 'edited', 1);
    ASSERT v_m.body = 'edited' AND v_m.version = 2 AND v_m.edited_at IS NOT NULL AND v_m.deleted_at IS NULL,
        format('edit: expected body edited, version 2, edited_at set, found %s', to_jsonb(v_m));
    SELECT * INTO STRICT v_stored FROM chat.messages WHERE id = v_id;
    ASSERT to_jsonb(v_stored) = to_jsonb(v_m), 'edit: expected the returned row to be the stored row';
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = v_before + 1,
        'edit: expected exactly one new event';
    ASSERT (SELECT count(*) FROM relay.events e
            WHERE e.scope = v_p AND e.seq = v_before + 1 AND e.resource = 'message'
              AND e.action = 'UPDATE' AND e.row_id = v_id AND e.data = to_jsonb(v_stored)) = 1,
        'edit: expected a message UPDATE event with the edited row';
END
$$;

SELECT pg_temp.snapshot() AS snapshot \gset

-- A stale version (1; the row is at 2): PR409.
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'bob', 'stale edit', 1);
    RAISE EXCEPTION 'expected PR409 for an edit with a stale version, but it succeeded';
EXCEPTION WHEN sqlstate 'PR409' THEN
    NULL;  -- expected
END
$$;

-- A future version (3) is a conflict too.
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'bob', 'future edit', 3);
    RAISE EXCEPTION 'expected PR409 for an edit with a version from the future, but it succeeded';
EXCEPTION WHEN sqlstate 'PR409' THEN
    NULL;  -- expected
END
$$;

-- A member who is not the sender: 42501.
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'carol', 'carol edits bob', 2);
    RAISE EXCEPTION 'expected 42501 for an edit by a member who is not the sender, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- The owner may delete others' messages but not edit them: 42501.
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'alice', 'owner edits bob', 2);
    RAISE EXCEPTION 'expected 42501 for an edit by the owner of someone else''s message, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- A non-member: 42501.
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'mallory', 'mallory edits', 2);
    RAISE EXCEPTION 'expected 42501 for an edit by a non-member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- An unknown message id: P0002.
DO $$
BEGIN
    PERFORM chat.edit_message('sqltest-no-such-' || gen_random_uuid(), 'bob', 'edit nothing', 1);
    RAISE EXCEPTION 'expected P0002 for an edit of an unknown message, but it succeeded';
EXCEPTION WHEN sqlstate 'P0002' THEN
    NULL;  -- expected
END
$$;

-- An empty body: 22023.
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'bob', '', 2);
    RAISE EXCEPTION 'expected 22023 for an edit to an empty body, but it succeeded';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- No expected version: 22023 (an edit is always compare-and-swap).
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'bob', 'blind edit', NULL);
    RAISE EXCEPTION 'expected 22023 for an edit without a version, but it succeeded';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

SELECT pg_temp.unchanged('refused edits') AS unchanged \gset

----------------------------------------------------------------------------
-- Delete: refusals first, then the sender's soft delete.
----------------------------------------------------------------------------

-- A member who is not the sender: 42501.
DO $$
BEGIN
    PERFORM chat.delete_message(current_setting('sqltest.bob_msg'), 'carol', 2);
    RAISE EXCEPTION 'expected 42501 for a delete by a member who is not the sender, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- A non-member: 42501.
DO $$
BEGIN
    PERFORM chat.delete_message(current_setting('sqltest.bob_msg'), 'mallory');
    RAISE EXCEPTION 'expected 42501 for a delete by a non-member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- The sender with a stale version: PR409.
DO $$
BEGIN
    PERFORM chat.delete_message(current_setting('sqltest.bob_msg'), 'bob', 1);
    RAISE EXCEPTION 'expected PR409 for a delete with a stale version, but it succeeded';
EXCEPTION WHEN sqlstate 'PR409' THEN
    NULL;  -- expected
END
$$;

-- An unknown message id: P0002.
DO $$
BEGIN
    PERFORM chat.delete_message('sqltest-no-such-' || gen_random_uuid(), 'bob');
    RAISE EXCEPTION 'expected P0002 for a delete of an unknown message, but it succeeded';
EXCEPTION WHEN sqlstate 'P0002' THEN
    NULL;  -- expected
END
$$;

SELECT pg_temp.unchanged('refused deletes') AS unchanged \gset

-- The sender with the current version: a soft delete, one UPDATE event.
DO $$
DECLARE
    v_p      text := current_setting('sqltest.p');
    v_id     text := current_setting('sqltest.bob_msg');
    v_before bigint;
    v_m      chat.messages;
    v_stored chat.messages;
BEGIN
    SELECT latest_seq INTO v_before FROM relay.scope_state(v_p);
    v_m := chat.delete_message(v_id, 'bob', 2);
    ASSERT v_m.deleted_at IS NOT NULL AND v_m.body = '' AND v_m.version = 3,
        format('soft delete: expected deleted_at set, empty body, version 3, found %s', to_jsonb(v_m));
    SELECT * INTO v_stored FROM chat.messages WHERE id = v_id;
    ASSERT FOUND, 'soft delete: expected the row to stay as a tombstone, found it gone';
    ASSERT to_jsonb(v_stored) = to_jsonb(v_m), 'soft delete: expected the returned row to be the stored row';
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = v_before + 1,
        'soft delete: expected exactly one new event';
    ASSERT (SELECT count(*) FROM relay.events e
            WHERE e.scope = v_p AND e.seq = v_before + 1 AND e.resource = 'message'
              AND e.action = 'UPDATE' AND e.row_id = v_id AND e.data = to_jsonb(v_stored)) = 1,
        'soft delete: expected a message UPDATE (not DELETE) event with the tombstone';
END
$$;

SELECT pg_temp.snapshot() AS snapshot \gset

-- Deleting twice: P0002.
DO $$
BEGIN
    PERFORM chat.delete_message(current_setting('sqltest.bob_msg'), 'bob');
    RAISE EXCEPTION 'expected P0002 for deleting a deleted message, but it succeeded';
EXCEPTION WHEN sqlstate 'P0002' THEN
    NULL;  -- expected
END
$$;

-- Editing a deleted message: P0002.
DO $$
BEGIN
    PERFORM chat.edit_message(current_setting('sqltest.bob_msg'), 'bob', 'raise the dead', 3);
    RAISE EXCEPTION 'expected P0002 for editing a deleted message, but it succeeded';
EXCEPTION WHEN sqlstate 'P0002' THEN
    NULL;  -- expected
END
$$;

SELECT pg_temp.unchanged('refused writes to a deleted message') AS unchanged \gset

-- The project owner may delete another member's message (no version given).
DO $$
DECLARE
    v_p      text := current_setting('sqltest.p');
    v_id     text := current_setting('sqltest.carol_msg');
    v_before bigint;
    v_m      chat.messages;
BEGIN
    SELECT latest_seq INTO v_before FROM relay.scope_state(v_p);
    v_m := chat.delete_message(v_id, 'alice');
    ASSERT v_m.id = v_id AND v_m.deleted_at IS NOT NULL AND v_m.body = '' AND v_m.version = 2
           AND v_m.sender_id = 'carol',
        format('owner delete: expected carol''s message deleted at version 2, found %s', to_jsonb(v_m));
    ASSERT (SELECT count(*) FROM relay.events e
            WHERE e.scope = v_p AND e.seq = v_before + 1 AND e.action = 'UPDATE' AND e.row_id = v_id
              AND (e.data ->> 'deleted_at') IS NOT NULL) = 1,
        'owner delete: expected one UPDATE event with deleted_at set';
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = v_before + 1,
        'owner delete: expected exactly one new event';
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
