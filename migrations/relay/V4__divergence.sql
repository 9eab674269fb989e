-- relay: G8, no silent divergence (DESIGN.md).
--
-- A cursor names an event, not only a number: (seq, created_at). Seqs alone
-- repeat when the database loses history that readers already saw: after a
-- failover to a standby that lacked the last commits, or a restore from a
-- backup, new events take the lost seqs again. created_at is the capture
-- time with microseconds (clock_timestamp(), a frame's "timestamp"), so two
-- events at one (scope, seq) in two histories differ in it unless both were
-- captured in the same microsecond. It costs capture nothing: the column,
-- and the frame field, exist already.
--
-- Every statement is idempotent, like those of V1 and V3.

-- Where a scope stands, with the capture time of its latest event: the
-- cursor a new subscriber starts from. latest_time is NULL when there is no
-- event yet, or when it was trimmed.
CREATE OR REPLACE FUNCTION relay.scope_head(p_scope text)
RETURNS TABLE (latest_seq bigint, trimmed_through bigint, latest_time timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT s.latest_seq, s.trimmed_through,
           (SELECT e.created_at FROM relay.events e
            WHERE e.scope = p_scope AND e.seq = s.latest_seq)
    FROM relay.scope_state(p_scope) s
$$;

-- The frames of one scope after a cursor, like relay.read_frames, but only
-- if the log still holds the event the cursor names. The relay reads this
-- way whenever it cannot vouch for a cursor: a client's resume, and the
-- first read of a project after any of its database connections broke
-- (the history may have changed behind it); otherwise it reads through
-- relay.read_frames, which costs less.
--
-- A cursor is unchecked (frames follow as with relay.read_frames) when it
-- names no time (p_after_time NULL: a client that sent since_seq alone),
-- is at seq 0, or lies in trimmed history (its event was deleted by
-- relay.trim; the reader sees the hole and resets). Otherwise, when no
-- event of the scope has that seq and capture time, the result is one row
-- with the cursor's seq and a NULL frame, and nothing else: the history
-- after the cursor is not the one its reader saw.
-- Cost: a primary-key lookup and a few more plan nodes on top of
-- relay.read_frames, about 90,000 instructions a read
-- (bench/results/read-profile.md). Like
-- relay.read_frames, new functions rather than a changed return type, so a
-- relay of an earlier version keeps reading during a rolling upgrade.
CREATE OR REPLACE FUNCTION relay.read_frames_checked(
    p_scope      text,
    p_after      bigint,
    p_after_time timestamptz,
    p_limit      int    DEFAULT 500,
    p_max_bytes  bigint DEFAULT 4194304
) RETURNS TABLE (seq bigint, created_at timestamptz, resource text, frame text, membership boolean)
LANGUAGE sql STABLE AS $$
    WITH anchor AS (
        SELECT p_after_time IS NULL
            OR p_after <= 0
            OR EXISTS (SELECT 1 FROM relay.events e
                       WHERE e.scope = p_scope AND e.seq = p_after
                         AND e.created_at = p_after_time)
            OR p_after <= coalesce((SELECT h.trimmed_through FROM relay.trim_horizon h
                                    WHERE h.scope = p_scope), 0) AS held
    )
    SELECT f.seq, f.created_at, f.resource, f.frame, f.membership
    FROM anchor CROSS JOIN LATERAL relay.read_frames(p_scope, p_after, p_limit, p_max_bytes) f
    WHERE anchor.held
    UNION ALL
    SELECT p_after, NULL, NULL, NULL, NULL FROM anchor WHERE NOT anchor.held
$$;

-- The same for many scopes in one round trip (each with its own cursor and
-- limits), in scope then seq order; what the relay's fetcher reads.
CREATE OR REPLACE FUNCTION relay.read_frames_checked_many(
    p_scopes      text[],
    p_after       bigint[],
    p_after_times timestamptz[],
    p_limit       int    DEFAULT 500,
    p_max_bytes   bigint DEFAULT 4194304
) RETURNS TABLE (scope text, seq bigint, created_at timestamptz, resource text, frame text,
                 membership boolean)
LANGUAGE sql STABLE AS $$
    SELECT w.scope, f.seq, f.created_at, f.resource, f.frame, f.membership
    FROM unnest(p_scopes, p_after, p_after_times) AS w(scope, after_seq, after_time)
    CROSS JOIN LATERAL relay.read_frames_checked(w.scope, w.after_seq, w.after_time,
                                                 p_limit, p_max_bytes) f
    ORDER BY w.scope, f.seq
$$;
