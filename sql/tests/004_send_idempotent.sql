-- 004_send_idempotent.sql: idempotent sends (incident 5: a retried send
-- inserted the message twice) and the checks of chat.send_message.
--
-- Checks that chat.send_message called again with the same
-- (project, sender, client_generated_id) returns the first call's row with
-- created = false (even with another body), writes nothing, burns no seq and
-- emits no second event; that the same client id from another sender is a
-- new message; that a raw duplicate INSERT is refused by the unique key;
-- that a retry of a since-deleted message returns the tombstone rather than
-- sending again; and that a non-member (or removed member, or unknown
-- project) is refused with 42501 and an empty body or bad client id with
-- 22023, none of which writes anything.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 004_send_idempotent.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

SELECT set_config('sqltest.p', 'sqltest-' || gen_random_uuid(), false) AS p \gset

BEGIN;

-- Fixture: the project (event 1), alice the owner and bob a member (2, 3).
INSERT INTO chat.projects (id, name) VALUES (:'p', 'sqltest send');
INSERT INTO chat.project_members (project_id, user_id, role)
VALUES (:'p', 'alice', 'owner'), (:'p', 'bob', 'member');

----------------------------------------------------------------------------
-- The first send creates; retries return the same row and write nothing.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p      text := current_setting('sqltest.p');
    r        record;
    v_first  chat.messages;
    v_stored chat.messages;
    v_n      bigint;
BEGIN
    SELECT * INTO STRICT r FROM chat.send_message(v_p, 'alice', 'hello', 'cid-1');
    v_first := r.message;
    ASSERT r.created, 'first send: expected created = true, found false';
    ASSERT v_first.body = 'hello' AND v_first.sender_id = 'alice' AND v_first.project_id = v_p
           AND v_first.client_generated_id = 'cid-1',
        format('first send: expected alice''s "hello" with client id cid-1, found %s', to_jsonb(v_first));
    ASSERT v_first.seq = 1 AND v_first.status = 'sent' AND v_first.version = 1 AND v_first.deleted_at IS NULL,
        format('first send: expected seq 1, status sent, version 1, not deleted, found %s', to_jsonb(v_first));
    SELECT * INTO STRICT v_stored FROM chat.messages WHERE id = v_first.id;
    ASSERT to_jsonb(v_stored) = to_jsonb(v_first), 'first send: expected the returned row to be the stored row';

    -- Its one event: seq 4, message INSERT, with the stored row.
    ASSERT (SELECT count(*) FROM relay.events e
            WHERE e.scope = v_p AND e.seq = 4 AND e.resource = 'message' AND e.action = 'INSERT'
              AND e.row_id = v_first.id AND e.data = to_jsonb(v_stored)) = 1,
        'first send: expected a message INSERT event at seq 4 with the stored row';

    -- Retry with the same client id (and a different body, as a buggy
    -- client might): the first row, created = false.
    SELECT * INTO STRICT r FROM chat.send_message(v_p, 'alice', 'hello again', 'cid-1');
    ASSERT NOT r.created, 'retry: expected created = false, found true';
    ASSERT to_jsonb(r.message) = to_jsonb(v_first),
        format('retry: expected the first row %s, found %s', to_jsonb(v_first), to_jsonb(r.message));

    SELECT * INTO STRICT r FROM chat.send_message(v_p, 'alice', 'hello', 'cid-1');
    ASSERT NOT r.created AND (r.message).id = v_first.id, 'second retry: expected the first row, created = false';

    -- One row, one message event, no seq burnt, nothing else written.
    SELECT count(*) INTO v_n FROM chat.messages
    WHERE project_id = v_p AND sender_id = 'alice' AND client_generated_id = 'cid-1';
    ASSERT v_n = 1, format('after retries: expected 1 message row for cid-1, found %s', v_n);
    SELECT count(*) INTO v_n FROM relay.events WHERE scope = v_p AND resource = 'message';
    ASSERT v_n = 1, format('after retries: expected 1 message event, found %s', v_n);
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = 4,
        'after retries: expected scope latest_seq still 4';
    ASSERT chat.latest_seq(v_p, 'alice') = 1,
        format('after retries: expected message latest_seq 1, found %s', chat.latest_seq(v_p, 'alice'));
END
$$;

----------------------------------------------------------------------------
-- The key is (project, sender, client id): another sender's cid-1, or
-- alice's cid-2, is a new message with the next seq.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
    r   record;
BEGIN
    SELECT * INTO STRICT r FROM chat.send_message(v_p, 'bob', 'hi from bob', 'cid-1');
    ASSERT r.created AND (r.message).seq = 2 AND (r.message).sender_id = 'bob',
        format('bob''s cid-1: expected a new message with seq 2, found created=%s %s', r.created, to_jsonb(r.message));

    SELECT * INTO STRICT r FROM chat.send_message(v_p, 'alice', 'second', 'cid-2');
    ASSERT r.created AND (r.message).seq = 3,
        format('alice''s cid-2: expected a new message with seq 3, found created=%s %s',
               r.created, to_jsonb(r.message));

    -- A 128-character client id is accepted.
    SELECT * INTO STRICT r FROM chat.send_message(v_p, 'alice', 'long id', repeat('k', 128));
    ASSERT r.created AND (r.message).seq = 4, 'a 128-character client id: expected a new message with seq 4';

    ASSERT (SELECT count(*) FROM relay.events WHERE scope = v_p AND resource = 'message') = 4,
        'expected 4 message events for 4 distinct sends';
END
$$;

-- A raw INSERT cannot duplicate a send either: the unique key refuses it.
DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
BEGIN
    INSERT INTO chat.messages (project_id, sender_id, body, client_generated_id)
    VALUES (v_p, 'alice', 'raw duplicate', 'cid-1');
    RAISE EXCEPTION 'expected 23505 (unique_violation) for a raw duplicate of cid-1, but the INSERT succeeded';
EXCEPTION WHEN unique_violation THEN
    NULL;  -- expected
END
$$;

----------------------------------------------------------------------------
-- A retry after the message was deleted returns the tombstone: the message
-- is not sent a second time.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p  text := current_setting('sqltest.p');
    v_id text;
    r    record;
BEGIN
    SELECT id INTO STRICT v_id FROM chat.messages
    WHERE project_id = v_p AND sender_id = 'alice' AND client_generated_id = 'cid-2';
    PERFORM chat.delete_message(v_id, 'alice');
    SELECT * INTO STRICT r FROM chat.send_message(v_p, 'alice', 'second', 'cid-2');
    ASSERT NOT r.created AND (r.message).id = v_id AND (r.message).deleted_at IS NOT NULL,
        format('retry of a deleted message: expected its tombstone with created = false, found created=%s %s',
               r.created, to_jsonb(r.message));
    ASSERT (SELECT count(*) FROM chat.messages WHERE project_id = v_p AND client_generated_id = 'cid-2') = 1,
        'retry of a deleted message: expected still 1 row for cid-2';
END
$$;

----------------------------------------------------------------------------
-- Refusals: each raises its SQLSTATE and writes nothing.
----------------------------------------------------------------------------

SELECT latest_seq AS before_refusals FROM relay.scope_state(:'p') \gset
SELECT set_config('sqltest.before_refusals', :'before_refusals', true) AS before_refusals \gset

-- A non-member may not send: 42501.
DO $$
BEGIN
    PERFORM chat.send_message(current_setting('sqltest.p'), 'mallory', 'let me in', 'cid-m');
    RAISE EXCEPTION 'expected 42501 for a send by a non-member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- Nor may anyone send to a project that does not exist: 42501.
DO $$
BEGIN
    PERFORM chat.send_message('sqltest-' || gen_random_uuid(), 'alice', 'hello?', 'cid-x');
    RAISE EXCEPTION 'expected 42501 for a send to an unknown project, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- An empty body: 22023.
DO $$
BEGIN
    PERFORM chat.send_message(current_setting('sqltest.p'), 'alice', '', 'cid-empty');
    RAISE EXCEPTION 'expected 22023 for an empty body, but the send succeeded';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- A NULL body: 22023.
DO $$
BEGIN
    PERFORM chat.send_message(current_setting('sqltest.p'), 'alice', NULL, 'cid-null');
    RAISE EXCEPTION 'expected 22023 for a NULL body, but the send succeeded';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- An empty client id: 22023.
DO $$
BEGIN
    PERFORM chat.send_message(current_setting('sqltest.p'), 'alice', 'body', '');
    RAISE EXCEPTION 'expected 22023 for an empty client id, but the send succeeded';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- A NULL client id: 22023.
DO $$
BEGIN
    PERFORM chat.send_message(current_setting('sqltest.p'), 'alice', 'body', NULL);
    RAISE EXCEPTION 'expected 22023 for a NULL client id, but the send succeeded';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

-- A 129-character client id: 22023.
DO $$
BEGIN
    PERFORM chat.send_message(current_setting('sqltest.p'), 'alice', 'body', repeat('k', 129));
    RAISE EXCEPTION 'expected 22023 for a 129-character client id, but the send succeeded';
EXCEPTION WHEN sqlstate '22023' THEN
    NULL;  -- expected
END
$$;

DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
BEGIN
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = current_setting('sqltest.before_refusals')::bigint,
        'refused sends: expected no new event';
    ASSERT (SELECT count(*) FROM chat.messages WHERE project_id = v_p) = 4,
        'refused sends: expected still 4 messages';
END
$$;

-- A removed member may no longer send, not even a retry of an earlier
-- message: membership is checked first, every time.
DELETE FROM chat.project_members WHERE project_id = :'p' AND user_id = 'bob';

DO $$
BEGIN
    PERFORM chat.send_message(current_setting('sqltest.p'), 'bob', 'hi from bob', 'cid-1');
    RAISE EXCEPTION 'expected 42501 for a retry by a removed member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
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
