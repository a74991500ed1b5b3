-- 0003: how a reply streamed, so that a finished one replays exactly as it streamed (the REST chat
-- API's GET /chats/{chat}/messages/{message}/events, whose event ids are token indexes):
-- per delta the engine sent, the generated tokens it covered and the characters of text it
-- carried (parallel arrays; their sums are completion_tokens and length(text)), and the engine's
-- finish reason (stop | length | cancelled | error). NULL in rows written before this migration
-- and in replies the sweeper marked interrupted: those replay as one delta.
ALTER TABLE messages
    ADD COLUMN delta_tokens integer[],
    ADD COLUMN delta_chars integer[],
    ADD COLUMN finish_reason text
        CHECK (finish_reason IN ('stop', 'length', 'cancelled', 'error'));
