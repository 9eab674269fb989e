-- Installs pgrelay into the current database: the relay engine, then the
-- chat reference app. Idempotent; run with
--   psql -v ON_ERROR_STOP=1 -f sql/install.sql "$DATABASE_URL"
-- For the engine alone, run only the first file.
\ir ../migrations/V1__relay.sql
\ir ../migrations/V2__chat.sql
