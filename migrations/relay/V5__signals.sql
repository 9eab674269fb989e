-- Ephemeral signals (G9): broadcasts and presence, across relays, through
-- Postgres and nothing else.
--
-- Broadcasts are never stored: a relay (or relay.broadcast, from SQL) sends
-- one NOTIFY on the signal channel, relay.signal_channel(), and every relay
-- LISTENing there hands it to its subscribers of the scope. At most once.
--
-- Presence lives in two unlogged tables every relay reads and writes:
-- relay.relays (one row per running relay, a lease it renews) and
-- relay.presence_members (one row per connection present in a scope). Each
-- change of a member row takes a new version from relay.presence_version
-- and sends a diff on the signal channel; relays keep a mirror of the
-- scopes their clients watch and apply diffs in version order. A member
-- that leaves keeps its row as a tombstone (state NULL) for a minute, so a
-- late diff cannot bring it back. A relay whose lease ran out (killed,
-- partitioned) has its members leave, by whichever relay sweeps first.
-- Unlogged: after a crash of the database nobody is present, which is true.

CREATE OR REPLACE FUNCTION relay.signal_channel() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT relay.channel() || '_signals'
$$;

-- The largest broadcast payload, in bytes of its JSON text. A NOTIFY
-- payload stops at 7999 bytes; this leaves room for the envelope (scope,
-- event name, sender) whatever their sizes.
CREATE OR REPLACE FUNCTION relay.max_broadcast_bytes() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 6144 $$;

-- The largest presence state of one connection, in bytes of its JSON text.
CREATE OR REPLACE FUNCTION relay.max_presence_bytes() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1024 $$;

-- Sends a broadcast to every subscriber of p_scope on every relay, as the
-- relay sends a client's: {"type":"broadcast","project_id":..,"event":..,
-- "from":p_from,"payload":..}. p_from NULL says the server sent it. Not
-- stored, no seq, at most once; sent when the calling transaction commits
-- (nothing on rollback). Granted by relay.grant_publisher.
CREATE OR REPLACE FUNCTION relay.broadcast(
    p_scope   text,
    p_event   text,
    p_payload jsonb DEFAULT NULL,
    p_from    text  DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_bytes    int;
    v_envelope text;
BEGIN
    IF p_scope IS NULL OR length(p_scope) = 0 OR octet_length(p_scope) > 256
       OR p_scope ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'relay.broadcast: scope must be 1 to 256 bytes without control characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_event IS NULL OR length(p_event) = 0 OR octet_length(p_event) > 64
       OR p_event ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'relay.broadcast: event must be 1 to 64 bytes without control characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_from IS NOT NULL AND (length(p_from) = 0 OR octet_length(p_from) > 128
                               OR p_from ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'relay.broadcast: from must be NULL or 1 to 128 bytes without control characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_bytes := octet_length(coalesce(p_payload, 'null'::jsonb)::text);
    IF v_bytes > relay.max_broadcast_bytes() THEN
        RAISE EXCEPTION 'relay.broadcast: payload is % bytes; a broadcast carries at most % (NOTIFY payloads stop at 8000 bytes)',
            v_bytes, relay.max_broadcast_bytes()
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'Store large data in a table and broadcast its key.';
    END IF;
    -- "n" makes every envelope unique: NOTIFY folds identical payloads of
    -- one transaction into one.
    v_envelope := json_build_object(
        'k', 'b', 's', p_scope, 'e', p_event, 'f', p_from,
        'p', coalesce(p_payload, 'null'::jsonb), 'n', nextval('relay.signal_nonce'))::text;
    -- With the limits above the envelope fits; should it not (a payload
    -- of many characters JSON escapes), say so rather than let NOTIFY.
    IF octet_length(v_envelope) > 7999 THEN
        RAISE EXCEPTION 'relay.broadcast: the broadcast is % bytes with its envelope; a NOTIFY carries at most 7999',
            octet_length(v_envelope)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    PERFORM pg_notify(relay.signal_channel(), v_envelope);
END
$$;

CREATE SEQUENCE IF NOT EXISTS relay.signal_nonce;

CREATE UNLOGGED TABLE IF NOT EXISTS relay.relays (
    relay_id   text PRIMARY KEY,
    -- Host and listen address (or PGRELAY_INSTANCE): a relay that starts
    -- where a dead one ran takes its members away at once.
    instance   text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE UNLOGGED TABLE IF NOT EXISTS relay.presence_members (
    scope      text NOT NULL,
    connection text NOT NULL,
    relay_id   text NOT NULL,
    user_id    text NOT NULL,
    -- NULL: the connection left (a tombstone, removed after a minute).
    state      jsonb,
    version    bigint NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, connection)
);
CREATE INDEX IF NOT EXISTS presence_members_relay ON relay.presence_members (relay_id);

CREATE SEQUENCE IF NOT EXISTS relay.presence_version;

-- Who is present now: members of relays whose lease has not run out.
CREATE OR REPLACE VIEW relay.presence AS
SELECT m.scope, m.user_id, m.connection, m.state, m.joined_at, m.updated_at
FROM relay.presence_members m
JOIN relay.relays r ON r.relay_id = m.relay_id
WHERE m.state IS NOT NULL AND r.expires_at >= now();

-- The diff every relay applies: {"k":"p","s":scope,"c":connection,
-- "u":user,"v":version,"st":state or null}.
CREATE OR REPLACE FUNCTION relay.presence_diff(
    p_scope text, p_connection text, p_user text, p_version bigint, p_state jsonb
) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT json_build_object('k', 'p', 's', p_scope, 'c', p_connection, 'u', p_user,
                             'v', p_version, 'st', p_state)::text
$$;

-- A relay's batch of presence changes: a state joins or updates, NULL
-- leaves. Each (scope, connection) appears once. Every change sends its
-- diff; a leave of what is not present changes nothing and sends none.
CREATE OR REPLACE FUNCTION relay.presence_apply(
    p_relay       text,
    p_scopes      text[],
    p_connections text[],
    p_users       text[],
    p_states      jsonb[]
) RETURNS int
LANGUAGE sql VOLATILE AS $$
    WITH input AS (
        SELECT * FROM unnest(p_scopes, p_connections, p_users, p_states)
            AS t(scope, connection, user_id, state)
    ), joined AS (
        INSERT INTO relay.presence_members AS m
            (scope, connection, relay_id, user_id, state, version)
        SELECT i.scope, i.connection, p_relay, i.user_id, i.state,
               nextval('relay.presence_version')
        FROM input i WHERE i.state IS NOT NULL
        ON CONFLICT (scope, connection) DO UPDATE
            SET state = excluded.state,
                user_id = excluded.user_id,
                relay_id = excluded.relay_id,
                -- Taken once the row is locked, so a row's versions follow
                -- its commits.
                version = nextval('relay.presence_version'),
                joined_at = CASE WHEN m.state IS NULL THEN now() ELSE m.joined_at END,
                updated_at = now()
        RETURNING m.scope, m.connection, m.user_id, m.version, m.state
    ), left_ AS (
        UPDATE relay.presence_members m
        SET state = NULL, version = nextval('relay.presence_version'), updated_at = now()
        FROM input i
        WHERE i.state IS NULL AND m.scope = i.scope AND m.connection = i.connection
          AND m.state IS NOT NULL
        RETURNING m.scope, m.connection, m.user_id, m.version, m.state
    )
    SELECT count(pg_notify(relay.signal_channel(),
                           relay.presence_diff(d.scope, d.connection, d.user_id, d.version, d.state)))::int
    FROM (SELECT * FROM joined UNION ALL SELECT * FROM left_) d
$$;

-- Members of relays whose lease ran out leave (each sends its diff), and
-- tombstones older than a minute go. Any relay may run it, at any time;
-- concurrent sweeps tombstone each member once.
CREATE OR REPLACE FUNCTION relay.presence_sweep() RETURNS int
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_left int;
BEGIN
    WITH gone AS (
        UPDATE relay.presence_members m
        SET state = NULL, version = nextval('relay.presence_version'), updated_at = now()
        WHERE m.state IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM relay.relays r
                          WHERE r.relay_id = m.relay_id AND r.expires_at >= now())
        RETURNING m.scope, m.connection, m.user_id, m.version, m.state
    )
    SELECT count(pg_notify(relay.signal_channel(),
                           relay.presence_diff(g.scope, g.connection, g.user_id, g.version, g.state)))::int
    INTO v_left FROM gone g;
    DELETE FROM relay.presence_members
    WHERE state IS NULL AND updated_at < now() - interval '1 minute';
    DELETE FROM relay.relays WHERE expires_at < now() - interval '1 minute';
    RETURN v_left;
END
$$;

-- A relay's lease: renews it for p_ttl, or takes a new one (the relay is
-- new, or was swept while it could not renew; a new relay also ends the
-- lease of a dead predecessor of the same instance, whose members the next
-- sweep then takes away). Returns how many connections the database holds
-- as present for this relay: when that is not what the relay holds, the
-- relay writes its members again.
CREATE OR REPLACE FUNCTION relay.relay_heartbeat(p_relay text, p_instance text, p_ttl interval)
RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE relay.relays SET expires_at = now() + p_ttl
    WHERE relay_id = p_relay AND expires_at >= now();
    IF NOT FOUND THEN
        UPDATE relay.relays SET expires_at = now() - interval '1 second'
        WHERE instance = p_instance AND relay_id <> p_relay AND expires_at >= now();
        INSERT INTO relay.relays (relay_id, instance, expires_at)
        VALUES (p_relay, p_instance, now() + p_ttl)
        ON CONFLICT (relay_id) DO UPDATE SET expires_at = excluded.expires_at;
    END IF;
    RETURN (SELECT count(*) FROM relay.presence_members m
            WHERE m.relay_id = p_relay AND m.state IS NOT NULL);
END
$$;

-- A relay going away cleanly: its members leave now, its lease ends.
CREATE OR REPLACE FUNCTION relay.relay_stop(p_relay text) RETURNS int
LANGUAGE sql VOLATILE AS $$
    UPDATE relay.relays SET expires_at = now() - interval '1 second' WHERE relay_id = p_relay;
    SELECT relay.presence_sweep();
$$;

-- The members of p_scopes as a relay's mirror starts from: every row, a
-- tombstone included, with the members of expired leases as left.
CREATE OR REPLACE FUNCTION relay.presence_rows(p_scopes text[])
RETURNS TABLE (scope text, connection text, user_id text, version bigint, state jsonb)
LANGUAGE sql STABLE AS $$
    SELECT m.scope, m.connection, m.user_id, m.version,
           CASE WHEN r.expires_at >= now() THEN m.state END
    FROM relay.presence_members m
    LEFT JOIN relay.relays r ON r.relay_id = m.relay_id
    WHERE m.scope = ANY (p_scopes)
$$;

-- Every signal function runs with the rights of the schema's owner, like
-- capture: the relay's role and publishers get EXECUTE, never the tables.
REVOKE ALL ON relay.relays, relay.presence_members FROM PUBLIC;
ALTER FUNCTION relay.broadcast(text, text, jsonb, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION relay.presence_apply(text, text[], text[], text[], jsonb[])
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION relay.presence_sweep()
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION relay.relay_heartbeat(text, text, interval)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION relay.relay_stop(text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION relay.presence_rows(text[])
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION relay.broadcast(text, text, jsonb, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION relay.presence_apply(text, text[], text[], text[], jsonb[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION relay.presence_sweep() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION relay.relay_heartbeat(text, text, interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION relay.relay_stop(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION relay.presence_rows(text[]) FROM PUBLIC;

-- The relay's role also keeps presence.
CREATE OR REPLACE FUNCTION relay.grant_relay(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA relay TO %s', p_role);
    EXECUTE format('GRANT SELECT ON relay.events, relay.scope_counter, relay.trim_horizon, '
                   'relay.membership_resources TO %s', p_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION relay.trim(int, interval, int) TO %s', p_role);
    EXECUTE format('GRANT SELECT ON relay.presence TO %s', p_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION relay.presence_apply(text, text[], text[], text[], jsonb[]), '
                   'relay.presence_sweep(), relay.relay_heartbeat(text, text, interval), '
                   'relay.relay_stop(text), relay.presence_rows(text[]) TO %s', p_role);
    -- `serve` reads the migration history to check the schema is current.
    IF to_regclass('refinery_schema_history') IS NOT NULL THEN
        EXECUTE format('GRANT SELECT ON refinery_schema_history TO %s', p_role);
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION relay.grant_relay(regrole) FROM PUBLIC;

-- Publishers may also broadcast.
CREATE OR REPLACE FUNCTION relay.grant_publisher(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA relay TO %s', p_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION relay.append(text, text, text, text, jsonb[]) TO %s', p_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION relay.broadcast(text, text, jsonb, text) TO %s', p_role);
END
$$;
REVOKE EXECUTE ON FUNCTION relay.grant_publisher(regrole) FROM PUBLIC;
