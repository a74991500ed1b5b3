-- 0001: users, chats and their messages.
--
-- Applied once, inside the migration runner's transaction (service/store/migrations.py):
-- never edit this file after it has shipped; add 0002_*.sql instead.

CREATE TABLE users (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE,
    token_hash  bytea UNIQUE,                           -- sha256 of the user's auth token
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE chats (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title       text,
    model       text NOT NULL,
    params      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The chat list: a user's chats newest first, paged by an (updated_at, id) cursor.
CREATE INDEX chats_user_recent ON chats (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    chat_id            uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq                bigint GENERATED ALWAYS AS IDENTITY,   -- the order of a chat's messages
    role               text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    text               text NOT NULL,
    status             text NOT NULL
                       CHECK (status IN ('generating', 'complete', 'cancelled', 'error', 'interrupted')),
    token_ids          integer[] NOT NULL DEFAULT '{}',
    -- A user message's token_ids replace the chat's ids from this position on (the rendered
    -- prompt may re-tokenise the end of the previous turn); 0 for other roles.
    prompt_offset      integer NOT NULL DEFAULT 0 CHECK (prompt_offset >= 0),
    prompt_tokens      integer,
    cached_tokens      integer,
    completion_tokens  integer,
    queued_ms          double precision,
    ttft_ms            double precision,
    total_ms           double precision,
    tokens_per_s       double precision,
    error              text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);

CREATE INDEX messages_chat_seq ON messages (chat_id, seq);

-- The startup sweep (generating -> interrupted) touches only the few rows left mid-generation.
CREATE INDEX messages_generating ON messages (status) WHERE status = 'generating';
