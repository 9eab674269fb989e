-- 014_signals.sql: G9, broadcasts and presence at the SQL level
-- (V5__signals.sql).
--
-- Checks that relay.broadcast refuses a scope, an event name, a sender or
-- a payload out of bounds with a clear message and SQLSTATE, before it
-- sends anything; that it accepts a payload of exactly
-- relay.max_broadcast_bytes() and takes one nonce per accepted broadcast
-- (so NOTIFY never folds two into one); that the largest envelope the
-- limits allow fits in a NOTIFY; that relay.presence_apply joins, updates
-- and leaves (a leave keeps a tombstone), each change taking a
-- higher version and sending one diff, a repeated leave sending none; that
-- relay.presence_diff is the documented envelope; that the relay.presence
-- view hides the members of an expired lease, which relay.presence_sweep
-- then tombstones (once, with new versions), and which
-- relay.presence_rows shows as left; that relay.relay_heartbeat renews a
-- lease and counts the relay's members, and that a new relay of the same
-- instance ends its predecessor's lease; that relay.relay_stop takes a
-- relay's members out; and the grants: a role with none can neither
-- broadcast nor read presence, relay.grant_publisher lets one broadcast
-- (and still not read the tables), relay.grant_relay lets one keep
-- presence and read the view, never the tables.
--
-- What psql cannot see: NOTIFY is delivered only on commit, and this
-- file rolls back, so no notice is ever sent or received here (a LISTEN
-- in this session would show nothing). What is checked instead is what
-- happens before the commit: the refusals, the nonce each accepted
-- broadcast takes (currval is this session's own), and the number of
-- diffs the presence functions return (each the count of their
-- pg_notify calls). That the envelopes reach relays and become frames is
-- checked by tests/g9_signals.rs, with committed broadcasts.
--
-- Run: psql -X -v ON_ERROR_STOP=1 -q -f 014_signals.sql postgresql://...
-- Everything is done in one transaction that is rolled back (now() is
-- fixed inside it: leases are made to expire by setting expires_at). On a
-- database with running relays, the sweeps here also count those relays'
-- expired members; the checks allow for that.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
SET plpgsql.check_asserts = on;

SELECT set_config('sqltest.p', 'sqltest-' || gen_random_uuid(), false) AS p \gset

BEGIN;

CREATE ROLE sqltest_nobody NOLOGIN;
CREATE ROLE sqltest_publisher NOLOGIN;
CREATE ROLE sqltest_relay NOLOGIN;

-- refused(sql): the SQLSTATE and message the statement raised, or NULL.
CREATE FUNCTION pg_temp.refused(p_sql text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE p_sql;
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ' ' || SQLERRM;
END
$$;

-- nonce(): the last nonce this session's broadcasts took, NULL if none.
CREATE FUNCTION pg_temp.nonce() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RETURN currval('relay.signal_nonce');
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RETURN NULL;
END
$$;

-- Broadcast: refusals first, none of which takes a nonce (nothing is sent).
DO $$
DECLARE
    p text := current_setting('sqltest.p');
    got text;
BEGIN
    ASSERT pg_temp.nonce() IS NULL, 'no broadcast yet in this session';
    ASSERT relay.signal_channel() = relay.channel() || '_signals', relay.signal_channel();
    ASSERT relay.max_broadcast_bytes() = 6144, 'the documented payload limit';
    ASSERT relay.max_presence_bytes() = 1024, 'the documented state limit';

    got := pg_temp.refused(format('SELECT relay.broadcast(%L, %L, to_jsonb(repeat(%L, 6143)))', p, 'e', 'x'));
    ASSERT got = '54000 relay.broadcast: payload is 6145 bytes; a broadcast carries at most 6144 (NOTIFY payloads stop at 8000 bytes)',
        format('over the limit by one byte: %s', got);
    got := pg_temp.refused(format('SELECT relay.broadcast(%L, %L, %L::jsonb)', p, 'e',
                                  '{"a": "' || repeat('x', 7000) || '"}'));
    ASSERT got LIKE '54000 relay.broadcast: payload is 7009 bytes;%', format('a large object: %s', got);
    FOREACH got IN ARRAY ARRAY[
        pg_temp.refused(format('SELECT relay.broadcast(NULL, %L)', 'e')),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L)', '', 'e')),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L)', repeat('s', 257), 'e')),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L)', 'p' || chr(1), 'e'))
    ] LOOP
        ASSERT got = '22023 relay.broadcast: scope must be 1 to 256 bytes without control characters',
            format('bad scope: %s', got);
    END LOOP;
    FOREACH got IN ARRAY ARRAY[
        pg_temp.refused(format('SELECT relay.broadcast(%L, NULL)', p)),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L)', p, '')),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L)', p, repeat('e', 65))),
        -- 64 characters but 65 bytes
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L)', p, repeat('e', 63) || 'é')),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L)', p, 'typ' || chr(10) || 'ing'))
    ] LOOP
        ASSERT got = '22023 relay.broadcast: event must be 1 to 64 bytes without control characters',
            format('bad event: %s', got);
    END LOOP;
    FOREACH got IN ARRAY ARRAY[
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L, NULL, %L)', p, 'e', '')),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L, NULL, %L)', p, 'e', repeat('u', 129))),
        pg_temp.refused(format('SELECT relay.broadcast(%L, %L, NULL, %L)', p, 'e', 'u' || chr(2)))
    ] LOOP
        ASSERT got = '22023 relay.broadcast: from must be NULL or 1 to 128 bytes without control characters',
            format('bad from: %s', got);
    END LOOP;
    ASSERT pg_temp.nonce() IS NULL, 'a refused broadcast sends nothing (it took no nonce)';
END
$$;

-- Accepted: at the limit exactly, a JSON null, a sender; each takes its
-- own nonce, so identical broadcasts in one transaction stay two notices.
DO $$
DECLARE
    p text := current_setting('sqltest.p');
    first bigint;
BEGIN
    PERFORM relay.broadcast(p, 'e', to_jsonb(repeat('x', 6142)));   -- 6,144 bytes with its quotes
    first := pg_temp.nonce();
    ASSERT first IS NOT NULL, 'an accepted broadcast took a nonce';
    PERFORM relay.broadcast(p, repeat('e', 64));                      -- payload NULL: JSON null
    PERFORM relay.broadcast(p, 'typing', '{"draft": true}', 'alice');
    PERFORM relay.broadcast(p, 'typing', '{"draft": true}', 'alice');
    -- currval is this session's: other sessions can only widen the gaps.
    ASSERT pg_temp.nonce() >= first + 3,
        format('one nonce per broadcast: %s after %s', pg_temp.nonce(), first);
    -- The largest envelope the limits allow (a scope and a sender of
    -- characters JSON escapes, a payload at the limit) still fits a NOTIFY.
    PERFORM relay.broadcast(repeat('"', 256), repeat('\', 64), to_jsonb(repeat('x', 6142)),
                            repeat('"', 128));
END
$$;

-- The diff envelope every relay applies.
DO $$
BEGIN
    ASSERT relay.presence_diff('s', 'r-1', 'ann', 7, '{"a": 1}')::jsonb
           = '{"k": "p", "s": "s", "c": "r-1", "u": "ann", "v": 7, "st": {"a": 1}}'::jsonb,
        relay.presence_diff('s', 'r-1', 'ann', 7, '{"a": 1}');
    ASSERT relay.presence_diff('s', 'r-1', 'ann', 8, NULL)::jsonb ->> 'st' IS NULL, 'a leave has st null';
    ASSERT relay.presence_diff('s', 'r-1', 'ann', 8, NULL)::jsonb ? 'st', 'a leave names st';
END
$$;

-- Presence through one relay's lease: join, update, leave, rejoin.
DO $$
DECLARE
    p  text := current_setting('sqltest.p');
    r1 text := p || '-r1';
    v1 bigint;
    v2 bigint;
    v3 bigint;
    n  int;
BEGIN
    ASSERT relay.relay_heartbeat(r1, p || '-host-a', '10 seconds') = 0, 'a new relay holds no member';
    ASSERT (SELECT expires_at = now() + interval '10 seconds' FROM relay.relays WHERE relay_id = r1),
        'the lease lasts the ttl';

    n := relay.presence_apply(r1, ARRAY[p, p, p], ARRAY[r1 || '-1', r1 || '-2', r1 || '-3'],
                              ARRAY['ann', 'ann', 'bob'],
                              ARRAY['{"tab": 1}', '{"tab": 2}', '{}']::jsonb[]);
    ASSERT n = 3, format('three joins send three diffs, not %s', n);
    ASSERT (SELECT count(DISTINCT version) FROM relay.presence_members WHERE scope = p) = 3,
        'each change has its own version';
    ASSERT (SELECT array_agg(user_id || ':' || connection ORDER BY connection) FROM relay.presence WHERE scope = p)
           = ARRAY['ann:' || r1 || '-1', 'ann:' || r1 || '-2', 'bob:' || r1 || '-3'],
        'relay.presence lists every connection with its user';
    ASSERT relay.relay_heartbeat(r1, p || '-host-a', '10 seconds') = 3, 'the heartbeat counts the relay''s members';

    -- An update: a new state and a higher version, the same row.
    SELECT version INTO v1 FROM relay.presence_members WHERE scope = p AND connection = r1 || '-1';
    n := relay.presence_apply(r1, ARRAY[p], ARRAY[r1 || '-1'], ARRAY['ann'], ARRAY['{"tab": 1, "typing": true}']::jsonb[]);
    ASSERT n = 1, format('an update sends one diff, not %s', n);
    SELECT version INTO v2 FROM relay.presence_members WHERE scope = p AND connection = r1 || '-1';
    ASSERT v2 > v1, format('version %s after %s', v2, v1);
    ASSERT (SELECT state FROM relay.presence WHERE scope = p AND connection = r1 || '-1')
           = '{"tab": 1, "typing": true}'::jsonb, 'the view shows the new state';

    -- A leave: a tombstone (state NULL, a higher version), gone from the view.
    n := relay.presence_apply(r1, ARRAY[p], ARRAY[r1 || '-1'], ARRAY['ann'], ARRAY[NULL]::jsonb[]);
    ASSERT n = 1, format('a leave sends one diff, not %s', n);
    SELECT version INTO v3 FROM relay.presence_members WHERE scope = p AND connection = r1 || '-1' AND state IS NULL;
    ASSERT v3 > v2, format('the tombstone''s version %s after %s', v3, v2);
    ASSERT NOT EXISTS (SELECT 1 FROM relay.presence WHERE connection = r1 || '-1'), 'a tombstone is not present';
    ASSERT relay.relay_heartbeat(r1, p || '-host-a', '10 seconds') = 2, 'nor counted';

    -- Leaving again changes nothing and sends nothing.
    n := relay.presence_apply(r1, ARRAY[p, p], ARRAY[r1 || '-1', r1 || '-9'], ARRAY['ann', 'zed'],
                              ARRAY[NULL, NULL]::jsonb[]);
    ASSERT n = 0, format('leaves of what is not present send %s diffs', n);
    ASSERT (SELECT version FROM relay.presence_members WHERE connection = r1 || '-1') = v3, 'the tombstone is unchanged';
    ASSERT NOT EXISTS (SELECT 1 FROM relay.presence_members WHERE connection = r1 || '-9'), 'no row for a stranger''s leave';

    -- Rejoining a tombstone: present again, with a newer version.
    n := relay.presence_apply(r1, ARRAY[p], ARRAY[r1 || '-1'], ARRAY['ann'], ARRAY['{}']::jsonb[]);
    ASSERT n = 1 AND (SELECT version FROM relay.presence_members WHERE connection = r1 || '-1') > v3, 'rejoined';
    ASSERT (SELECT count(*) FROM relay.presence WHERE scope = p) = 3, 'three connections present again';
END
$$;

-- A lease that runs out: hidden at once, tombstoned by a sweep, once.
DO $$
DECLARE
    p  text := current_setting('sqltest.p');
    r1 text := p || '-r1';
    r2 text := p || '-r2';
    before_sweep int;
    swept int;
    vs bigint[];
BEGIN
    PERFORM relay.relay_heartbeat(r2, p || '-host-b', '10 seconds');
    PERFORM relay.presence_apply(r2, ARRAY[p, p], ARRAY[r2 || '-1', r2 || '-2'], ARRAY['cid', 'ann'],
                                 ARRAY['{}', '{}']::jsonb[]);
    ASSERT (SELECT count(*) FROM relay.presence WHERE scope = p) = 5, 'five present on two relays';

    -- r2 missed its renewals (killed, cut off).
    UPDATE relay.relays SET expires_at = now() - interval '1 second' WHERE relay_id = r2;
    ASSERT (SELECT array_agg(DISTINCT user_id ORDER BY user_id) FROM relay.presence WHERE scope = p) = ARRAY['ann', 'bob'],
        'the view hides r2''s members as soon as its lease ran out';
    ASSERT (SELECT count(*) FROM relay.presence_rows(ARRAY[p]) WHERE connection LIKE r2 || '-%' AND state IS NULL) = 2,
        'a loading mirror sees them as left';

    SELECT array_agg(version ORDER BY connection) INTO vs FROM relay.presence_members WHERE relay_id = r2;
    -- Whatever else in this database the sweep takes (other relays' expired members).
    SELECT count(*) INTO before_sweep FROM relay.presence_members m
    WHERE m.state IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM relay.relays r WHERE r.relay_id = m.relay_id AND r.expires_at >= now());
    swept := relay.presence_sweep();
    ASSERT swept = before_sweep AND swept >= 2, format('the sweep sent %s diffs for %s expired members', swept, before_sweep);
    ASSERT (SELECT bool_and(state IS NULL) FROM relay.presence_members WHERE relay_id = r2), 'r2''s members are tombstones';
    ASSERT (SELECT bool_and(m.version > old.v)
            FROM relay.presence_members m
            JOIN unnest(vs, ARRAY[r2 || '-1', r2 || '-2']) AS old(v, c) ON old.c = m.connection),
        'each with a newer version';
    ASSERT relay.presence_sweep() = 0, 'a second sweep tombstones nobody again';
    ASSERT (SELECT count(*) FROM relay.presence WHERE scope = p) = 3, 'r1''s members stay';

    -- r2 comes back alive: a new lease, and the count (0) that makes it
    -- write its members again.
    ASSERT relay.relay_heartbeat(r2, p || '-host-b', '10 seconds') = 0, 'a swept relay holds nobody';
    ASSERT (SELECT expires_at > now() FROM relay.relays WHERE relay_id = r2), 'it has a lease again';

    -- Old tombstones and long-dead leases go.
    UPDATE relay.presence_members SET updated_at = now() - interval '61 seconds' WHERE relay_id = r2;
    PERFORM relay.presence_sweep();
    ASSERT NOT EXISTS (SELECT 1 FROM relay.presence_members WHERE relay_id = r2), 'tombstones older than a minute are deleted';
    UPDATE relay.relays SET expires_at = now() - interval '61 seconds' WHERE relay_id = r2;
    PERFORM relay.presence_sweep();
    ASSERT NOT EXISTS (SELECT 1 FROM relay.relays WHERE relay_id = r2), 'leases expired over a minute ago are deleted';
    ASSERT EXISTS (SELECT 1 FROM relay.relays WHERE relay_id = r1), 'a live lease stays';
END
$$;

-- A new relay of the same instance (a restart after a crash) ends its
-- predecessor's lease at once; a clean stop takes the members out.
DO $$
DECLARE
    p  text := current_setting('sqltest.p');
    r1 text := p || '-r1';
    r3 text := p || '-r3';
    r4 text := p || '-r4';
BEGIN
    ASSERT (SELECT expires_at > now() FROM relay.relays WHERE relay_id = r1), 'r1 looks alive';
    ASSERT relay.relay_heartbeat(r3, p || '-host-a', '10 seconds') = 0, 'r3 starts where r1 ran';
    ASSERT (SELECT expires_at < now() FROM relay.relays WHERE relay_id = r1), 'r1''s lease ended';
    ASSERT NOT EXISTS (SELECT 1 FROM relay.presence WHERE scope = p), 'its members are hidden at once';
    ASSERT relay.presence_sweep() >= 3, 'and the sweep takes them out';
    ASSERT (SELECT bool_and(state IS NULL) FROM relay.presence_members WHERE relay_id = r1), 'r1''s members are tombstones';
    ASSERT relay.relay_heartbeat(r3, p || '-host-a', '10 seconds') = 0 AND
           (SELECT expires_at > now() FROM relay.relays WHERE relay_id = r3), 'r3 renews its own lease';

    PERFORM relay.relay_heartbeat(r4, p || '-host-d', '10 seconds');
    PERFORM relay.presence_apply(r4, ARRAY[p], ARRAY[r4 || '-1'], ARRAY['dan'], ARRAY['{}']::jsonb[]);
    ASSERT relay.relay_stop(r4) >= 1, 'a clean stop sends its member''s leave';
    ASSERT (SELECT state IS NULL FROM relay.presence_members WHERE connection = r4 || '-1'), 'a tombstone now';
    ASSERT NOT EXISTS (SELECT 1 FROM relay.presence WHERE scope = p), 'nobody present';
END
$$;

-- Grants: nothing by default; a publisher may broadcast; the relay's role
-- keeps presence through the functions and reads the view. Nobody gets the
-- tables.
SELECT relay.grant_publisher('sqltest_publisher');
SELECT relay.grant_relay('sqltest_relay');
DO $$
DECLARE
    v_role text;
    v_fn text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['sqltest_nobody', 'sqltest_publisher', 'sqltest_relay'] LOOP
        ASSERT NOT has_table_privilege(v_role, 'relay.presence_members', 'SELECT'), v_role || ' may read presence_members';
        ASSERT NOT has_table_privilege(v_role, 'relay.relays', 'SELECT'), v_role || ' may read relays';
    END LOOP;
    FOREACH v_fn IN ARRAY ARRAY[
        'relay.broadcast(text, text, jsonb, text)',
        'relay.presence_apply(text, text[], text[], text[], jsonb[])',
        'relay.presence_sweep()', 'relay.relay_heartbeat(text, text, interval)',
        'relay.relay_stop(text)', 'relay.presence_rows(text[])'
    ] LOOP
        ASSERT NOT has_function_privilege('sqltest_nobody', v_fn, 'EXECUTE'), 'nobody may run ' || v_fn;
    END LOOP;
END
$$;

SET ROLE sqltest_nobody;
DO $$
DECLARE
    p text := current_setting('sqltest.p');
    v_attempt text;
BEGIN
    FOREACH v_attempt IN ARRAY ARRAY[
        format('SELECT relay.broadcast(%L, %L)', p, 'e'),
        'SELECT count(*) FROM relay.presence_members',
        'SELECT count(*) FROM relay.presence',
        'SELECT count(*) FROM relay.relays',
        format('SELECT relay.presence_apply(%L, ARRAY[%L], ARRAY[%L], ARRAY[%L], ARRAY[%L]::jsonb[])', p, p, 'c', 'u', '{}'),
        'SELECT relay.presence_sweep()',
        format('NOTIFY sqltest_probe')  -- control: this one is allowed
    ] LOOP
        BEGIN
            EXECUTE v_attempt;
            ASSERT v_attempt LIKE 'NOTIFY%', 'a role without grants could run: ' || v_attempt;
        EXCEPTION WHEN insufficient_privilege THEN
            ASSERT v_attempt NOT LIKE 'NOTIFY%', 'NOTIFY needs no privilege';
        END;
    END LOOP;
END
$$;
RESET ROLE;

SELECT pg_temp.nonce() AS nonce_before \gset
SET ROLE sqltest_publisher;
DO $$
DECLARE
    p text := current_setting('sqltest.p');
BEGIN
    PERFORM relay.broadcast(p, 'from_a_publisher', '{"ok": true}');
    BEGIN
        PERFORM count(*) FROM relay.presence_members;
        RAISE EXCEPTION 'a publisher can read presence_members';
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
END
$$;
RESET ROLE;
SELECT pg_temp.nonce() > :nonce_before AS publisher_broadcast_accepted \gset
\if :publisher_broadcast_accepted
\else
    SELECT 1/0 AS the_publisher_broadcast_took_no_nonce;
\endif

SET ROLE sqltest_relay;
DO $$
DECLARE
    p text := current_setting('sqltest.p');
    r text := p || '-r5';
BEGIN
    ASSERT relay.relay_heartbeat(r, p || '-host-e', '10 seconds') = 0, 'the relay role takes a lease';
    ASSERT relay.presence_apply(r, ARRAY[p], ARRAY[r || '-1'], ARRAY['eve'], ARRAY['{"x": 1}']::jsonb[]) = 1,
        'and writes presence';
    ASSERT (SELECT user_id FROM relay.presence WHERE scope = p) = 'eve', 'and reads the view';
    ASSERT (SELECT count(*) FROM relay.presence_rows(ARRAY[p]) WHERE state IS NOT NULL) = 1, 'and loads mirrors';
    BEGIN
        PERFORM count(*) FROM relay.presence_members;
        RAISE EXCEPTION 'the relay role can read presence_members directly';
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
    BEGIN
        PERFORM relay.broadcast(p, 'e');
        RAISE EXCEPTION 'the relay role can call relay.broadcast without grant_publisher';
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
    ASSERT relay.relay_stop(r) >= 1, 'and stops';
    ASSERT NOT EXISTS (SELECT 1 FROM relay.presence WHERE scope = p), 'its member left';
END
$$;
RESET ROLE;

ROLLBACK;
