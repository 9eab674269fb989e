-- 007_unread_and_marks.sql: unread counts, delivery and read marks, latest
-- seq and the project list.
--
-- Checks that chat.unread_count counts others' messages after the user's
-- read cursor (never the user's own, never deleted ones); that
-- chat.mark_delivered and chat.mark_read move statuses only forward
-- (sent -> delivered -> read; read never goes back to delivered), only on
-- others' messages, return how many messages they changed, never move the
-- member's cursors backwards, and are captured as message UPDATE events
-- only (the chat app leaves the cursors out of project_member events, so a
-- mark is no project_member event: migrations/chat/V2__columns.sql); that chat.latest_seq is the last message seq (0
-- for a project without messages); that chat.list_projects lists exactly the
-- user's projects with role and latest seq; and that a non-member is
-- refused with 42501 by each of these functions.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 007_unread_and_marks.sql postgresql://...
-- Everything is done in one transaction that is rolled back. The only
-- statements outside it are session settings and read-only checks.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

-- Fresh projects P and Q and fresh user ids (list_projects is per user, so
-- the users must not exist elsewhere in the database).
SELECT set_config('sqltest.p', 'sqltest-' || gen_random_uuid(), false) AS p,
       set_config('sqltest.q', 'sqltest-' || gen_random_uuid(), false) AS q,
       set_config('sqltest.alice', 'sqltest-alice-' || gen_random_uuid(), false) AS alice,
       set_config('sqltest.bob', 'sqltest-bob-' || gen_random_uuid(), false) AS bob,
       set_config('sqltest.carol', 'sqltest-carol-' || gen_random_uuid(), false) AS carol,
       set_config('sqltest.mallory', 'sqltest-mallory-' || gen_random_uuid(), false) AS mallory \gset

BEGIN;

-- Fixture: P has alice (owner), bob and carol; Q has alice (owner) and bob
-- and no messages. In P: seq 1 alice, 2 bob, 3 alice, 4 bob, 5 alice.
INSERT INTO chat.projects (id, name) VALUES (:'p', 'sqltest marks P'), (:'q', 'sqltest marks Q');
INSERT INTO chat.project_members (project_id, user_id, role)
VALUES (:'p', :'alice', 'owner'), (:'p', :'bob', 'member'), (:'p', :'carol', 'member'),
       (:'q', :'alice', 'owner'), (:'q', :'bob', 'member');

DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
BEGIN
    FOR i IN 1..5 LOOP
        PERFORM chat.send_message(v_p, current_setting(CASE WHEN i % 2 = 0 THEN 'sqltest.bob' ELSE 'sqltest.alice' END),
                                  format('message %s', i), format('cid-%s', i));
    END LOOP;
END
$$;

-- statuses(): the statuses of P's messages in seq order.
CREATE FUNCTION pg_temp.statuses() RETURNS text[]
LANGUAGE sql AS $$
    SELECT array_agg(status ORDER BY seq) FROM chat.messages WHERE project_id = current_setting('sqltest.p')
$$;

-- cursors(user): the member's (last_delivered_seq, last_read_seq) in P.
CREATE FUNCTION pg_temp.cursors(p_user text) RETURNS bigint[]
LANGUAGE sql AS $$
    SELECT ARRAY[last_delivered_seq, last_read_seq] FROM chat.project_members
    WHERE project_id = current_setting('sqltest.p') AND user_id = p_user
$$;

----------------------------------------------------------------------------
-- latest_seq and list_projects.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p     text := current_setting('sqltest.p');
    v_q     text := current_setting('sqltest.q');
    v_alice text := current_setting('sqltest.alice');
    v_bob   text := current_setting('sqltest.bob');
    v_list  text[];
BEGIN
    ASSERT chat.latest_seq(v_p, v_bob) = 5, format('latest_seq(P): expected 5, found %s', chat.latest_seq(v_p, v_bob));
    ASSERT chat.latest_seq(v_q, v_bob) = 0, format('latest_seq(Q): expected 0, found %s', chat.latest_seq(v_q, v_bob));

    -- Both projects were created at the same now(), so they are listed by id.
    SELECT array_agg(l.id || ':' || l.role || ':' || l.latest_seq || ':' || l.name ORDER BY ordinality) INTO v_list
    FROM chat.list_projects(v_bob) WITH ORDINALITY AS l;
    ASSERT v_list = (SELECT array_agg(x ORDER BY x) FROM unnest(ARRAY[
                        v_p || ':member:5:sqltest marks P', v_q || ':member:0:sqltest marks Q']) x),
        format('list_projects(bob): expected P (member, 5) and Q (member, 0) ordered by id, found %s', v_list);

    SELECT array_agg(l.id || ':' || l.role || ':' || l.latest_seq ORDER BY l.id) INTO v_list
    FROM chat.list_projects(v_alice) l;
    ASSERT v_list = (SELECT array_agg(x ORDER BY x) FROM unnest(ARRAY[v_p || ':owner:5', v_q || ':owner:0']) x),
        format('list_projects(alice): expected P and Q as owner, found %s', v_list);

    SELECT array_agg(l.id) INTO v_list FROM chat.list_projects(current_setting('sqltest.carol')) l;
    ASSERT v_list = ARRAY[v_p], format('list_projects(carol): expected only P, found %s', v_list);

    ASSERT NOT EXISTS (SELECT 1 FROM chat.list_projects(current_setting('sqltest.mallory'))),
        'list_projects(mallory): expected no projects';
END
$$;

----------------------------------------------------------------------------
-- Unread counts: others' messages only.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p text := current_setting('sqltest.p');
BEGIN
    ASSERT chat.unread_count(v_p, current_setting('sqltest.alice')) = 2,
        format('unread(alice): expected 2 (bob''s), found %s',
               chat.unread_count(v_p, current_setting('sqltest.alice')));
    ASSERT chat.unread_count(v_p, current_setting('sqltest.bob')) = 3,
        format('unread(bob): expected 3 (alice''s), found %s', chat.unread_count(v_p, current_setting('sqltest.bob')));
    ASSERT chat.unread_count(v_p, current_setting('sqltest.carol')) = 5,
        format('unread(carol): expected 5, found %s', chat.unread_count(v_p, current_setting('sqltest.carol')));
    ASSERT pg_temp.statuses() = ARRAY['sent', 'sent', 'sent', 'sent', 'sent'],
        format('initial statuses: expected all sent, found %s', pg_temp.statuses());
END
$$;

----------------------------------------------------------------------------
-- Marks: forward only, others' messages only, captured as events.
----------------------------------------------------------------------------

DO $$
DECLARE
    v_p      text := current_setting('sqltest.p');
    v_bob    text := current_setting('sqltest.bob');
    v_before bigint;
    v_n      integer;
    v_events text[];
BEGIN
    -- bob received up to 3: alice's 1 and 3 become delivered, his own 2 not.
    SELECT latest_seq INTO v_before FROM relay.scope_state(v_p);
    v_n := chat.mark_delivered(v_p, v_bob, 3);
    ASSERT v_n = 2, format('mark_delivered(bob, 3): expected 2 messages changed, found %s', v_n);
    ASSERT pg_temp.statuses() = ARRAY['delivered', 'sent', 'delivered', 'sent', 'sent'],
        format('after mark_delivered(bob, 3): expected delivered, sent, delivered, sent, sent, found %s',
               pg_temp.statuses());
    ASSERT pg_temp.cursors(v_bob) = ARRAY[3, 0]::bigint[],
        format('after mark_delivered(bob, 3): expected bob''s cursors (3, 0), found %s', pg_temp.cursors(v_bob));
    -- Captured: two message UPDATEs; bob's cursors are left out of
    -- project_member events, so moving them is no event.
    SELECT array_agg(resource || ':' || action || ':' || coalesce(data ->> 'seq', row_id)
                     ORDER BY resource, data ->> 'seq')
    INTO v_events FROM relay.events WHERE scope = v_p AND seq > v_before;
    ASSERT v_events = ARRAY['message:UPDATE:1', 'message:UPDATE:3'],
        format('mark_delivered(bob, 3): expected UPDATE events for messages 1, 3 only, found %s',
               v_events);
    ASSERT chat.unread_count(v_p, v_bob) = 3, 'after mark_delivered: expected bob''s unread still 3';

    -- Again: nothing left to change.
    v_n := chat.mark_delivered(v_p, v_bob, 3);
    ASSERT v_n = 0, format('mark_delivered(bob, 3) again: expected 0 changed, found %s', v_n);

    -- bob read up to 1.
    v_n := chat.mark_read(v_p, v_bob, 1);
    ASSERT v_n = 1, format('mark_read(bob, 1): expected 1 message changed, found %s', v_n);
    ASSERT pg_temp.statuses() = ARRAY['read', 'sent', 'delivered', 'sent', 'sent'],
        format('after mark_read(bob, 1): expected read, sent, delivered, sent, sent, found %s', pg_temp.statuses());
    ASSERT pg_temp.cursors(v_bob) = ARRAY[3, 1]::bigint[],
        format('after mark_read(bob, 1): expected bob''s cursors (3, 1), found %s', pg_temp.cursors(v_bob));
    ASSERT chat.unread_count(v_p, v_bob) = 2,
        format('after mark_read(bob, 1): expected bob''s unread 2, found %s', chat.unread_count(v_p, v_bob));

    -- Delivered up to 5: only 5 changes; read 1 stays read (never backwards).
    v_n := chat.mark_delivered(v_p, v_bob, 5);
    ASSERT v_n = 1, format('mark_delivered(bob, 5): expected 1 message changed, found %s', v_n);
    ASSERT pg_temp.statuses() = ARRAY['read', 'sent', 'delivered', 'sent', 'delivered'],
        format('after mark_delivered(bob, 5): expected read, sent, delivered, sent, delivered, found %s',
               pg_temp.statuses());
    ASSERT pg_temp.cursors(v_bob) = ARRAY[5, 1]::bigint[],
        format('after mark_delivered(bob, 5): expected bob''s cursors (5, 1), found %s', pg_temp.cursors(v_bob));

    -- Lower marks move no cursor back and change nothing.
    SELECT latest_seq INTO v_before FROM relay.scope_state(v_p);
    v_n := chat.mark_delivered(v_p, v_bob, 2);
    ASSERT v_n = 0, format('mark_delivered(bob, 2): expected 0 changed, found %s', v_n);
    v_n := chat.mark_read(v_p, v_bob, 0);
    ASSERT v_n = 0, format('mark_read(bob, 0): expected 0 changed, found %s', v_n);
    ASSERT pg_temp.cursors(v_bob) = ARRAY[5, 1]::bigint[],
        format('after lower marks: expected bob''s cursors still (5, 1), found %s', pg_temp.cursors(v_bob));
    ASSERT (SELECT latest_seq FROM relay.scope_state(v_p)) = v_before,
        'lower marks: expected no event';
END
$$;

DO $$
DECLARE
    v_p     text := current_setting('sqltest.p');
    v_alice text := current_setting('sqltest.alice');
    v_bob   text := current_setting('sqltest.bob');
    v_carol text := current_setting('sqltest.carol');
    v_n     integer;
BEGIN
    -- alice read up to 4: bob's 2 and 4 become read, her own stay as they are.
    v_n := chat.mark_read(v_p, v_alice, 4);
    ASSERT v_n = 2, format('mark_read(alice, 4): expected 2 messages changed, found %s', v_n);
    ASSERT pg_temp.statuses() = ARRAY['read', 'read', 'delivered', 'read', 'delivered'],
        format('after mark_read(alice, 4): expected read, read, delivered, read, delivered, found %s',
               pg_temp.statuses());
    ASSERT pg_temp.cursors(v_alice) = ARRAY[4, 4]::bigint[],
        format('after mark_read(alice, 4): expected alice''s cursors (4, 4), found %s', pg_temp.cursors(v_alice));
    ASSERT chat.unread_count(v_p, v_alice) = 0,
        format('after mark_read(alice, 4): expected alice''s unread 0, found %s', chat.unread_count(v_p, v_alice));

    -- Deleted messages are not counted: alice deletes her message 5.
    PERFORM chat.delete_message((SELECT id FROM chat.messages WHERE project_id = v_p AND seq = 5), v_alice);
    ASSERT chat.unread_count(v_p, v_bob) = 1,
        format('after deleting 5: expected bob''s unread 1 (message 3), found %s', chat.unread_count(v_p, v_bob));
    ASSERT chat.unread_count(v_p, v_carol) = 4,
        format('after deleting 5: expected carol''s unread 4, found %s', chat.unread_count(v_p, v_carol));

    -- bob reads everything.
    PERFORM chat.mark_read(v_p, v_bob, 5);
    ASSERT chat.unread_count(v_p, v_bob) = 0,
        format('after mark_read(bob, 5): expected bob''s unread 0, found %s', chat.unread_count(v_p, v_bob));
    ASSERT pg_temp.cursors(v_bob) = ARRAY[5, 5]::bigint[],
        format('after mark_read(bob, 5): expected bob''s cursors (5, 5), found %s', pg_temp.cursors(v_bob));
    ASSERT (pg_temp.statuses())[1:4] = ARRAY['read', 'read', 'read', 'read'],
        format('after mark_read(bob, 5): expected messages 1..4 read, found %s', pg_temp.statuses());

    -- Read messages are never marked delivered again.
    v_n := chat.mark_delivered(v_p, v_carol, 5);
    ASSERT v_n = 0, format('mark_delivered(carol, 5) over read messages: expected 0 changed, found %s', v_n);
    ASSERT (pg_temp.statuses())[1:4] = ARRAY['read', 'read', 'read', 'read'],
        format('after mark_delivered(carol, 5): expected messages 1..4 still read, found %s', pg_temp.statuses());
    ASSERT pg_temp.cursors(v_carol) = ARRAY[5, 0]::bigint[],
        format('after mark_delivered(carol, 5): expected carol''s cursors (5, 0), found %s', pg_temp.cursors(v_carol));
    ASSERT chat.unread_count(v_p, v_carol) = 4,
        format('carol has read nothing: expected unread 4, found %s', chat.unread_count(v_p, v_carol));
END
$$;

----------------------------------------------------------------------------
-- Non-members: 42501 from each function.
----------------------------------------------------------------------------

DO $$
BEGIN
    PERFORM chat.unread_count(current_setting('sqltest.p'), current_setting('sqltest.mallory'));
    RAISE EXCEPTION 'expected 42501 for unread_count by a non-member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

DO $$
BEGIN
    PERFORM chat.mark_delivered(current_setting('sqltest.p'), current_setting('sqltest.mallory'), 5);
    RAISE EXCEPTION 'expected 42501 for mark_delivered by a non-member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

DO $$
BEGIN
    PERFORM chat.mark_read(current_setting('sqltest.p'), current_setting('sqltest.mallory'), 5);
    RAISE EXCEPTION 'expected 42501 for mark_read by a non-member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

DO $$
BEGIN
    PERFORM chat.latest_seq(current_setting('sqltest.p'), current_setting('sqltest.mallory'));
    RAISE EXCEPTION 'expected 42501 for latest_seq by a non-member, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

-- carol is not in Q.
DO $$
BEGIN
    PERFORM chat.unread_count(current_setting('sqltest.q'), current_setting('sqltest.carol'));
    RAISE EXCEPTION 'expected 42501 for unread_count in a project the user is not in, but it succeeded';
EXCEPTION WHEN sqlstate '42501' THEN
    NULL;  -- expected
END
$$;

ROLLBACK;

-- After the rollback nothing of either project is left.
DO $$
DECLARE
    v_scopes text[] := ARRAY[current_setting('sqltest.p'), current_setting('sqltest.q')];
BEGIN
    IF EXISTS (SELECT 1 FROM relay.events WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM relay.scope_counter WHERE scope = ANY (v_scopes))
       OR EXISTS (SELECT 1 FROM chat.projects WHERE id = ANY (v_scopes)) THEN
        RAISE EXCEPTION 'after ROLLBACK, expected nothing left of scopes %, found rows', v_scopes;
    END IF;
END
$$;
